"""``taskman completion bash|zsh``: print a shell completion script.

Completes the commands, each command's options, and task ids: those of the
``--user-id`` already on the command line, from ``taskman list -o json``
(the first field of each line is ``task_id``). Install with, for example,
``taskman completion bash > /etc/bash_completion.d/taskman`` or
``source <(taskman completion zsh)``.
"""

import sys

COMMANDS = "start run get-status stop stream list usage completion"
OPTIONS = {
    "start": "--user-id --server-address --separate-streams --output --help",
    "run": "--user-id --server-address --output --help",
    "get-status": "--user-id --server-address --output --help",
    "stop": "--user-id --server-address --no-wait --output --help",
    "stream": ("--user-id --server-address --stdout --stderr --timestamps --tail --since "
               "--no-follow --offset --help"),
    "list": "--user-id --owner --status --limit --server-address --output --help",
    "usage": "--user-id --user --all --server-address --output --help",
    "completion": "bash zsh",
}

BASH = r"""# bash completion for taskman (taskman completion bash)
_taskman_task_ids() {
    local user="" address="" i
    for ((i = 1; i < ${#COMP_WORDS[@]}; i++)); do
        case "${COMP_WORDS[i]}" in
            --user-id) user="${COMP_WORDS[i+1]}" ;;
            --server-address) address="${COMP_WORDS[i+1]}" ;;
        esac
    done
    [ -n "$user" ] || return
    taskman list --user-id "$user" ${address:+--server-address "$address"} -o json 2>/dev/null \
        | sed -n 's/^{"task_id": "\([^"]*\)".*/\1/p'
}

_taskman() {
    local current="${COMP_WORDS[COMP_CWORD]}" previous="${COMP_WORDS[COMP_CWORD-1]}"
    local command="${COMP_WORDS[1]}" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        [ "${COMP_WORDS[i]}" = "--" ] && return  # the task's own command line
    done
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "COMMANDS --help --version" -- "$current"))
        return
    fi
    case "$previous" in
        -o|--output) COMPREPLY=($(compgen -W "table json" -- "$current")); return ;;
        --status) COMPREPLY=($(compgen -W "started signaled exited_ok exited_error unknown" -- "$current")); return ;;
        --user-id|--server-address|--owner|--limit|--tail|--since|--offset) return ;;
    esac
    case "$command" in
OPTION_CASES
    esac
    if [[ "$current" != -* ]]; then
        case "$command" in
            get-status|stop|stream)
                COMPREPLY=($(compgen -W "$(_taskman_task_ids)" -- "$current")); return ;;
        esac
    fi
    COMPREPLY=($(compgen -W "$options" -- "$current"))
}
complete -F _taskman taskman
"""

ZSH = r"""#compdef taskman
# zsh completion for taskman (taskman completion zsh): bash's, through bashcompinit.
autoload -U +X bashcompinit && bashcompinit
"""


def bash_script() -> str:
    cases = "\n".join(f'        {command}) options="{words}" ;;'
                      for command, words in OPTIONS.items())
    return BASH.replace("COMMANDS", COMMANDS).replace("OPTION_CASES", cases)


def main(argv: list, usage_error) -> int:
    """Print the script for ``argv[0]`` ("bash" or "zsh"); usage_error otherwise."""
    if len(argv) != 1 or argv[0] not in ("bash", "zsh"):
        raise usage_error("usage: taskman completion (bash | zsh)")
    script = bash_script()
    if argv[0] == "zsh":
        script = ZSH + script.split("\n", 1)[1]
    sys.stdout.write(script)
    return 0
