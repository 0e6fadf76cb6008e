# shellcheck shell=sh
# The ready check: the one check the spawner runs on the host when, waiting
# for a launched server from the hub (the launch's own wait was 0), it finds
# the server's port accepting connections, or wants to know whether the
# server still runs. Starts one `sh` and, when the server lives, one `ss`.
#
# Gets, from the preamble (src/plan/poll.rs): `d` (the server directory),
# `pid`, `start`, `uid` (as the launch recorded them), `port` and
# `port_hex`, `launch_failed`; and lib.sh's helpers.
#
# Prints `listening=yes` when the server lives and a socket of its login
# listens on the port (another user's listener is never taken for it),
# `listening=no` while it lives without one, and exits 0. When it is gone
# (or its pid is another process now) it prints the launch's failure report
# (report_failure: `exited [STATUS]` and the log's last lines) and exits
# `$launch_failed`.
#
# The preamble's values: read with `$`, as the shell has no other way.
# shellcheck disable=SC2154
find_ss
# The server is known by its pid and start time; `uid` picks the listeners
# that count.
if [ -e "$d/exit_status" ] || ! same_process "$pid" "$start"; then
  report_failure
fi
if is_listening "$uid"; then echo listening=yes; else echo listening=no; fi
