# shellcheck shell=sh
# The guard: what a script that may remove a server directory runs first
# (src/plan/state.rs puts it, with its preamble, in front of that script's
# `main`). It exits `$guard_refused` (before anything is read, signalled or
# removed) unless the directory is `$HOME/STATE_DIR/RUN_ID` of the login it
# runs as; otherwise it prints nothing and lets the script run.
#
# Gets, from its preamble: `guard_dir` (the server directory),
# `guard_suffix` (`/STATE_DIR/RUN_ID`), `guard_refused` (the exit status).
#
# The preamble's values: read with `$`, as the shell has no other way.
# shellcheck disable=SC2154
g_h=${HOME%/}
if [ "$g_h$guard_suffix" != "$guard_dir" ]; then
  echo "ssh-spawner: refusing: $guard_dir is not $g_h$guard_suffix (the server directory must be under this login's home)" >&2
  exit "$guard_refused"
fi
