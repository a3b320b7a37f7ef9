// An independent TaskManager client: grpc-js with the proto loaded at run
// time from proto/ (no generated code, nothing of taskman's Python), over
// mutual TLS. Starts a task with separate streams, waits for it to end,
// streams its output and prints one JSON object: the task id, the status,
// and each output message's offset, stream, time and bytes (base64).
//
// usage: node client.js <address> <certs dir> <user> <proto root> <command> [args...]
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, certs, user, protoRoot, command, ...args] = process.argv.slice(2);

const definition = protoLoader.loadSync("taskman/api/task_manager.proto", {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const api = grpc.loadPackageDefinition(definition);
const Service = api.task_manager ? api.task_manager.TaskManager : lookup(api, "TaskManager");

function lookup(namespace, name) {
  for (const value of Object.values(namespace)) {
    if (typeof value === "function" && value.service && value.serviceName === name) return value;
    if (value && typeof value === "object" && !value.format) {
      const found = lookup(value, name);
      if (found) return found;
    }
  }
  return undefined;
}

const read = (name) => fs.readFileSync(path.join(certs, name));
const credentials = grpc.credentials.createSsl(
  read("ca.crt"), read(`${user}.key`), read(`${user}.crt`));
const client = new Service(address, credentials);

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30000 }, (error, response) =>
      error ? reject(error) : resolve(response));
  });
}

async function main() {
  const started = await call("StartTask", { command, args, separate_streams: true });
  const task_id = started.task_id;
  let status;
  for (let tries = 0; tries < 300; tries++) {
    status = await call("GetTaskStatus", { task_id });
    if (status.status !== "JOB_STATUS_STARTED") break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const chunks = [];
  let version = null;
  await new Promise((resolve, reject) => {
    const stream = client.StreamTaskOutput({ task_id });
    stream.on("metadata", (metadata) => { version = metadata.get("taskman-version")[0] || null; });
    stream.on("data", (response) => chunks.push({
      offset: Number(response.offset),
      stream: response.stream,
      time: response.time ? Number(response.time.seconds) * 1e3 + response.time.nanos / 1e6 : null,
      output: Buffer.from(response.output).toString("base64"),
    }));
    stream.on("error", reject);
    stream.on("end", resolve);
  });
  const tail = [];
  await new Promise((resolve, reject) => {
    const stream = client.StreamTaskOutput({ task_id, selector: "OUTPUT_SELECTOR_STDERR" });
    stream.on("data", (response) => tail.push(Buffer.from(response.output).toString("base64")));
    stream.on("error", reject);
    stream.on("end", resolve);
  });
  process.stdout.write(JSON.stringify({ task_id, status: status.status, version, chunks,
                                        stderr: tail }) + "\n");
  client.close();
}

main().catch((error) => {
  process.stderr.write(`node client failed: ${error.code} ${error.details || error.message}\n`);
  process.exit(1);
});
