# shellcheck shell=sh
# The wrapper that owns the server. Gets `DIR ARGV...` as its arguments and
# fd 3 open on the pipe the launch reads the pid from; prints nothing (its
# output is the server's log); writes `DIR/pid` and `DIR/exit_status`.
#
# The launch passes this file's code (comment lines left out) as a value:
# it runs it with `eval` in a subshell of the launch when the launch leads
# its process group (the login sshd started for the session, whose argv
# carries the marker `ssh-spawner-run:RUN_ID`), and otherwise as
# `setsid -f /bin/sh -c WRAPPER MARKER DIR ARGV...`, leading a session of
# its own. Either way the group is that of everything the server starts
# without calling setsid, and it outlives the launch.
#
# It ignores TERM/INT/HUP only after the fork, so the server does not
# inherit ignored signals, and so that a TERM to the group stops the server
# while the wrapper lives on to record the exit status. It starts with the
# umask the login and the prologue left, which the server inherits at the
# fork (the subshell forks once and execs, so `$!` is the server); then it
# takes umask 077 for its own files. The pid file is written first (one
# `echo`, a builtin: a reader sees no file, an empty one or the whole
# number, and adopt takes only a number), so it exists by the time the
# launch returns; then the pid goes down fd 3, which the launch is blocked
# reading (no polling, no `sleep`). The server does not inherit fd 3, so the
# launch sees end-of-file at once. The exit status is written to a temporary
# name and renamed (off the start's path), since poll reads its presence as
# "exited".
d=$1
shift
(exec 3>&-; exec "$@") &
c=$!
umask 077
trap '' TERM INT HUP
echo "$c" >"$d/pid"
echo "$c" >&3
exec 3>&-
wait "$c"
s=$?
echo "$s" >"$d/exit_status.tmp" && mv -f -- "$d/exit_status.tmp" "$d/exit_status"
