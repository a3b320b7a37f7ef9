"""Generated gRPC modules for proto/taskman/api/task_manager.proto (committed; see README)."""
