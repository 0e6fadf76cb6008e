# shellcheck shell=sh
# The launch: starts one single-user server, detached, in a process group of
# its own that outlives the SSH session, under the wrapper (wrapper.sh).
#
# Gets, from the preamble (src/plan/launch.rs):
#   d             the server directory; `parent` its parent
#   port          the port the server will listen on; `port_hex` in hex
#   ready_cs      centiseconds to wait for the port to listen (0: not at all)
#   check_port    1: refuse to start when something listens on the port
#   dir_made      1: the spawner made `d` already (only check it is there);
#                 0: make it here
#   gpus          the server's GPU UUIDs, one a line, for `$d/gpus`; empty:
#                 none
#   default_signal yes|no|test: whether `env --default-signal` is used, or
#                 tested here
#   cd_home       1: start in $HOME; 0: start in `workdir`
#   marker        `ssh-spawner-run:RUN_ID`, the wrapper's $0 when it is an `sh`
#   wrapper       the wrapper's code
#   server_argv   the server's argv (limit prefix included) as quoted words
#   launch_failed, port_taken   the exit statuses below
#   ssp_exports_and_prologue    a function: the `export`s of the server's
#                 environment, then the admin's prologue lines
# and lib.sh's helpers.
#
# Prints, exit status:
#   0              `pid=`, `pgid=`, `start_time=`, `uid=`, `boot_id=` and
#                  `listening=yes|no` lines
#   $port_taken    `port-taken`; nothing was started
#   $launch_failed the server died before its port listened (within
#                  `ready_cs`), or the wrapper reported no pid: `exited
#                  [STATUS]` and `log: LINE` lines (report_failure)
#   4              the server's wrapper vanished under it; stderr says so
#   other          a step failed (mkdir, the prologue's `cd`, a missing
#                  `setsid`); stderr says which
#
# The prologue runs with `set +eu`: admin lines often source profile scripts
# that use unset variables or let commands fail. Only the script's own files
# get umask 077; the prologue and the server run with the login's umask, and
# the server with whatever the prologue set. The `uid=` reported is the
# launching login's real uid (the server's, as nothing between them can
# change it without privileges).
#
# Every process the script starts is on the critical path of a start (each
# costs a fork and an exec on the host; docs/benchmarks.md, "The launch,
# step by step"). Before the pid is known the host runs, when the launch
# leads its group (sshd's sessions): `mkdir` (while the script reads its own
# status and the boot id), the command substitution's fork, the wrapper
# subshell's fork and its fork; the port check's `ss` only when the spawner
# could not ask sshd. A launch that does not lead its group adds `setsid`,
# its fork and the wrapper's `sh`.
#
# The preamble's values: read with `$`, as the shell has no other way.
# shellcheck disable=SC2154
set -eu
# The run directory: made by the spawner already (`dir_made`: one SFTP
# request on a session its pooled connection keeps open, no program on the
# host; the script only tests that it is there, below). Otherwise it is made
# 0700 by a `mkdir` started first thing, in the background, so that it runs
# while `sh` reads its own status and the boot id (and while the port check
# runs, when there is one).
if [ "$dir_made" = 0 ]; then
  mkdir -m 700 -- "$d" 2>/dev/null &
  mk=$!
fi
read_boot_id
# The login's umask and uid are read from /proc/self/status with the `read`
# builtin, not with `$(umask)` (a fork each); the prologue's umask reaches
# the server by inheritance, and the wrapper takes 077 for its own files
# after its fork. `server.log` is created (0600) before the prologue runs,
# so its umask never applies to it.
um='' login_uid=''
{ while read -r s_k s_v _; do
  case $s_k in Umask:) um=$s_v ;; Uid:) login_uid=$s_v; break ;; esac
done; } 2>/dev/null </proc/self/status || :
case $um in ''|*[!0-7]*) um=$(umask) ;; esac
umask 077
find_ss
# How the wrapper starts, decided before the exports and the prologue run.
# When the launch leads its process group (sshd makes each session's login
# a session leader; a group whose id is the script's pid exists only then,
# which `kill -s 0` tells without reading a file), the wrapper is a subshell
# of it: no program runs before the pid is known, and the subshell's pid
# (`$!`) comes down the pipe next to the server's, so that the server's stat
# line alone proves its parent is that wrapper. Otherwise (a login shell
# that forks its command) `setsid` and a wrapper `sh` make the group.
if kill -s 0 -- "-$$" 2>/dev/null; then lead_group=1; else lead_group=0; fi
# ssp_start_server DIR DEFAULT_SIGNAL LEAD_GROUP MARKER WRAPPER ARGV...:
# starts the wrapper, which starts the server; writes the wrapper's pid as
# `wPID` to fd 4 when it is a subshell. Its arguments are all it uses: it
# runs after the prologue, which may have set any variable.
#
# A non-interactive sh starts `cmd &` with SIGINT and SIGQUIT ignored and
# dash does not let the child undo that, so the command goes through `env
# --default-signal` (coreutils >= 8.31) when the host has it (a fact read
# with the host's other facts; tested here when unknown).
ssp_start_server() {
  start_dir=$1 start_signal=$2 start_lead=$3 start_marker=$4 start_wrapper=$5
  shift 5
  case $start_signal in
    yes) set -- "$start_dir" env --default-signal=INT,QUIT -- "$@" ;;
    no) set -- "$start_dir" "$@" ;;
    *)
      if env --default-signal=INT,QUIT true >/dev/null 2>&1; then
        set -- "$start_dir" env --default-signal=INT,QUIT -- "$@"
      else
        set -- "$start_dir" "$@"
      fi ;;
  esac
  if [ "$start_lead" = 1 ]; then
    (
      set +eu
      eval "$start_wrapper"
    ) 3>&4 4>&- </dev/null >>"$start_dir/server.log" 2>&1 &
    echo "w$!" >&4
  else
    exec setsid -f /bin/sh -c "$start_wrapper" "$start_marker" "$@" 3>&4 4>&- </dev/null >>"$start_dir/server.log" 2>&1
  fi
}
# The port check (before the start when `check_port`, and each turn of the
# readiness wait) asks `ss -l` for listeners on the port (is_listening).
if [ "$check_port" = 1 ] && is_listening; then
  if [ "$dir_made" = 0 ]; then wait "$mk" || :; fi
  echo port-taken
  exit "$port_taken"
fi
# Only when the directory is not there (the parent is missing: the first
# launch as this login; or a directory of an earlier attempt is there; or
# the spawner's directory is gone) the parent is made with umask 077 and
# `install -d -m 700` makes both 0700. Stale files are removed only if there
# are any.
dir_ok=1
if [ "$dir_made" = 1 ]; then
  [ -d "$d" ] || dir_ok=0
else
  wait "$mk" || dir_ok=0
fi
if [ "$dir_ok" = 0 ]; then
  [ -d "$parent" ] || mkdir -p -- "$parent"
  install -d -m 700 -- "$parent" "$d"
fi
for f in pid exit_status exit_status.tmp; do
  if [ -e "$d/$f" ]; then rm -f -- "$d/$f"; fi
done
: >>"$d/server.log"
# The server's GPUs, one UUID a line (0600 by the umask above), so that the
# host records who holds which; no file when it has none.
if [ -n "$gpus" ]; then printf '%s\n' "$gpus" >"$d/gpus"; fi
# The exports, prologue and start run in a command substitution (a
# subshell) so that neither the env (think IFS or PATH) nor the prologue
# can change the variables and IFS the rest of the script relies on; what
# the start needs after the prologue is kept in the positional parameters,
# which neither can change (the prologue is a function: a `set --` in it is
# its own). Its stdout is the pipe the wrapper writes the server's pid to
# (fd 4 until the start, fd 3 in the wrapper). The prologue's output goes to
# the server's log, and the prologue gets neither the pipe nor the channel's
# stdout or stderr, so nothing it leaves running (`Xvfb :99 &`) can hold the
# launch open: sshd closes a session's channel only once every holder of its
# output has closed it. (dash's `read` takes a byte per system call: every
# file read on this path costs hundreds of them.)
pid=$(
  exec 4>&1 >&2
  umask "$um"
  set -- "$cd_home" "$workdir" "$d" "$default_signal" "$lead_group" "$marker" "$wrapper"
  eval "set -- \"\$@\" $server_argv"
  set +eu
  ssp_exports_and_prologue 4>&- </dev/null >>"$3/server.log" 2>&1
  set -eu
  if [ "$1" = 1 ]; then cd -- "$HOME"; else cd -- "$2"; fi
  shift 2
  ssp_start_server "$@"
)
# The pid comes down a pipe instead of being polled for, the wrapper writes
# the pid file with a builtin (no `mv`), and the server's stat line (and its
# parent's, when the wrapper does not lead the group) proves that the
# wrapper is its parent and the group is theirs.
out=$pid pid='' wrapper_pid=''
for x in $out; do
  case $x in w*) wrapper_pid=${x#w} ;; *) pid=$x ;; esac
done
case $pid in
  ''|*[!0-9]*) report_failure ;;
esac
# Then, for up to `ready_cs`, the script waits for the port to listen (the
# hub's first check then succeeds) or for the server to exit (the start
# fails with its log), checking every 10 ms at first and every 50 ms after
# the first second. It counts only a listener with the login's uid, so
# another user's socket on the port (on an address the spawner's probe did
# not reach) is never taken for the server.
ready=no
if [ "$ready_cs" -gt 0 ]; then
  read_uptime
  end=$((now + ready_cs))
  n=0
  while :; do
    if [ -e "$d/exit_status" ] || ! read_stat "$pid" || ! is_live; then report_failure; fi
    if is_listening "$login_uid"; then ready=yes; break; fi
    read_uptime
    [ "$now" -lt "$end" ] || break
    n=$((n + 1))
    if [ "$n" -le 20 ]; then sleep 0.01; elif [ "$n" -le 50 ]; then sleep 0.02; else sleep 0.05; fi
  done
fi
if [ ! -e "$d/exit_status" ] && read_stat "$pid" && is_live; then
  start=$s_start w=$s_ppid g=$s_pgrp
  if [ -z "$login_uid" ]; then read_uid "$pid" || report_failure; login_uid=$s_uid; fi
  if [ "$w" -gt 1 ] && { [ "$g" = "$w" ] || { [ "$g" = "$$" ] && [ "$w" = "$wrapper_pid" ]; }; }; then
    printf 'pid=%s\npgid=%s\nstart_time=%s\nuid=%s\nboot_id=%s\nlistening=%s\n' "$pid" "$g" "$start" "$login_uid" "$boot" "$ready"
    exit 0
  fi
  echo "ssh-spawner launch: server pid $pid is no longer a child of its wrapper" >&2
  exit 4
fi
report_failure
