# shellcheck shell=sh
# The poll: what became of many servers of ONE login on one host; one exec
# answers for all. It only reads files with shell builtins, so it starts no
# process at all.
#
# Gets, from the preamble (src/plan/poll.rs): `servers`, six quoted words
# per server (RUN_ID PID START_TIME UID BOOT_ID DIR, as the launch recorded
# them), read back with `eval`; and lib.sh's helpers.
#
# Prints one line per server, `RUN_ID STATE [STATUS]`, STATE one of
# `running exited zombie reused rebooted gone` (same_process tells which),
# STATUS the number in `DIR/exit_status` when that file exists (never for
# `running`). Exits 0.
#
# The preamble's values: read with `$`, as the shell has no other way.
# shellcheck disable=SC2154
set -u
umask 077
# read_exit_status DIR: whether DIR/exit_status exists (`exit_file` 1 or
# empty) and the number in it (`exit_status`, empty when none).
read_exit_status() {
  exit_file='' exit_status=''
  [ -e "$1/exit_status" ] || return 0
  exit_file=1
  IFS= read -r exit_status 2>/dev/null <"$1/exit_status" || :
  case $exit_status in ''|*[!0-9]*) exit_status='' ;; esac
}
# report RUN_ID STATE: one line of output, with `exit_status` when known.
report() {
  printf '%s %s%s\n' "$1" "$2" "${exit_status:+ $exit_status}"
}
# poll_server RUN_ID PID START UID BOOT DIR: reports one server.
poll_server() {
  if same_process "$2" "$3" "$4" "$5"; then
    exit_status=''
    report "$1" running
    return 0
  fi
  read_exit_status "$6"
  # A process that is simply gone either recorded its status or did not.
  if [ "$identity" = gone ] && [ -n "$exit_file" ]; then identity=exited; fi
  report "$1" "$identity"
}
read_boot_id
read_login_uid
eval "set -- $servers"
while [ "$#" -ge 6 ]; do
  poll_server "$1" "$2" "$3" "$4" "$5" "$6"
  shift 6
done
