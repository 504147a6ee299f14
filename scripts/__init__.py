"""Scripts behind the README commands (set-up, main job, tests)."""
