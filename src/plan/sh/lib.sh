# shellcheck shell=sh
# The helpers every script that looks at a server's processes shares
# (launch, ready, poll, stop, adopt). The assembly (src/plan/sh.rs) puts this
# file inside the script's `main` function, after the preamble and before the
# script's own body, with comment lines left out.
#
# Gets, from the preamble: `d`, `port`, `port_hex` and `launch_failed`, read
# only by the functions that name them. Defines only functions and the
# constants `nl` (a newline) and `dfl` (the default IFS), and sets IFS to
# it: nothing here starts a process or reads a file until a body calls it.
# The functions leave what they read in variables (`s_*`, `boot`,
# `login_uid`, `identity`) that the bodies read.
# shellcheck disable=SC2154,SC2034
#
# Everything reads /proc with the `read` builtin rather than with helpers,
# since one poll covers hundreds of servers; dash's `read` takes one byte
# per system call, so each file read still costs hundreds of them.
nl='
'
dfl=" 	$nl"
IFS=$dfl

# read_stat PID: reads /proc/PID/stat into `s_state s_ppid s_pgrp s_start`
# (fields 3, 4, 5 and 22); false when there is no such process.
# Field 2 (comm) is chosen by the program, may hold spaces, ')' and even
# newlines, so only the text after the last ')' is split, and when comm
# spans lines the last line is the one holding the numeric fields. The
# shortest-prefix strip comes first because dash's longest-prefix match is
# quadratic, which is most of the CPU time of a large poll.
read_stat() {
  s_line=
  { while IFS= read -r s_l; do s_line=$s_l; done; } 2>/dev/null <"/proc/$1/stat" || return 1
  case $s_line in *')'*) ;; *) return 1 ;; esac
  s_line=${s_line#*')'}
  case $s_line in *')'*) s_line=${s_line##*')'} ;; esac
  set -f
  # Split on purpose: the fields after comm are words.
  # shellcheck disable=SC2086
  set -- $s_line
  set +f
  [ "$#" -ge 20 ] || return 1
  s_state=$1 s_ppid=$2 s_pgrp=$3
  shift 19
  s_start=$1
}

# read_uid PID: reads the real uid of PID into `s_uid`; false when there is
# no such process.
read_uid() {
  s_uid=
  { while read -r s_k s_v s_r; do case $s_k in Uid:) s_uid=$s_v; break ;; esac; done; } 2>/dev/null <"/proc/$1/status" || return 1
  [ -n "$s_uid" ]
}

# is_live: false when the state `read_stat` read last is a zombie (Z) or
# dead (X).
is_live() {
  case $s_state in Z|X) return 1 ;; esac
}

# read_boot_id: the host's boot id into `boot` (empty when unreadable); it
# changes when the host reboots, which makes every recorded pid meaningless.
read_boot_id() {
  boot=
  IFS= read -r boot 2>/dev/null </proc/sys/kernel/random/boot_id || boot=
}

# read_uptime: centiseconds since boot into `now` (/proc/uptime, read with a
# builtin): the clock of the scripts' waits. Waits are bounded by it, not by
# counting turns, since on a loaded host a turn (a `sleep`, a process-table
# read) takes far longer than it says.
read_uptime() {
  IFS=' .' read -r u_s u_c _ </proc/uptime
  now=$u_s$u_c
}

# read_login_uid: this login's real uid into `login_uid` (empty when
# unreadable). A recorded uid that is another user's names a process that is
# not this login's server, whatever its pid and start time say.
read_login_uid() {
  login_uid=
  if read_uid "$$"; then login_uid=$s_uid; fi
}

# same_process PID START [UID BOOT]: whether PID is still the process a
# launch recorded: there, not a zombie, started at START; with UID and BOOT
# also on the same boot and with the same real uid, that uid this login's
# (`read_boot_id` and `read_login_uid` first). Sets `identity` to `running`,
# or to why not: `rebooted`, `gone`, `zombie`, `reused`. The checks run
# cheapest and most decisive first: a reboot makes every pid meaningless; a
# missing /proc entry needs nothing more; a zombie has no owner worth
# checking. On success `s_ppid` and `s_pgrp` are PID's.
same_process() {
  if [ "$#" -ge 4 ] && [ "$4" != "$boot" ]; then identity=rebooted; return 1; fi
  if ! read_stat "$1"; then identity=gone; return 1; fi
  if ! is_live; then identity=zombie; return 1; fi
  if [ "$s_start" != "$2" ]; then identity=reused; return 1; fi
  if [ "$#" -ge 4 ]; then
    if ! read_uid "$1"; then identity=gone; return 1; fi
    if [ "$s_uid" != "$3" ] || [ "$3" != "$login_uid" ]; then identity=reused; return 1; fi
  fi
  identity=running
}

# is_listening [UID]: whether something (owned by UID, when given) listens
# on TCP port `$port` (`$port_hex` in hex), asked of `ss` (a netlink dump of
# the listening sockets only) when `$ss` names it, else read from
# /proc/net/tcp* with `grep`.
# Reading /proc/net/tcp and tcp6 makes the kernel walk the whole
# established-connections hash (262144 buckets on the 2-core test machine:
# 6 to 13 ms per file, per read), and dash's `read` takes one byte per
# system call; `grep` of those files is the fallback on a host without a
# working `ss` (iproute2).
is_listening() {
  if [ -n "$ss" ] && l_out=$(ss -Hltne "sport = :$port" 2>/dev/null); then
    case ${1:-0} in
      0) [ -n "$l_out" ] ;;
      *) case $l_out in *" uid:$1 "*) ;; *) false ;; esac ;;
    esac
  else
    case ${1:-0} in
      0) grep -qsE "^ *[0-9]+: [0-9A-F]+:$port_hex [0-9A-F]+:[0-9A-F]+ 0A " /proc/net/tcp /proc/net/tcp6 ;;
      *) grep -qsE "^ *[0-9]+: [0-9A-F]+:$port_hex [0-9A-F]+:[0-9A-F]+ 0A [0-9A-F]+:[0-9A-F]+ [0-9A-F]+:[0-9A-F]+ [0-9A-F]+ +$1 " /proc/net/tcp /proc/net/tcp6 ;;
    esac
  fi
}

# find_ss: `ss` into `ss` when the host has it, for `is_listening`.
find_ss() {
  ss=
  if command -v ss >/dev/null 2>&1; then ss=ss; fi
}

# report_failure: prints the failure report of a server that died (`exited
# STATUS`, then `log: LINE` for the last lines of `$d/server.log`) and exits
# `$launch_failed`. The wrapper writes `exit_status` right after it reaps
# the server, so a short wait is enough to get the real status.
report_failure() {
  i=0
  while [ "$i" -lt 50 ] && [ ! -e "$d/exit_status" ]; do
    i=$((i + 1))
    sleep 0.02
  done
  x=
  if [ -e "$d/exit_status" ]; then
    IFS= read -r x 2>/dev/null <"$d/exit_status" || :
  fi
  case $x in ''|*[!0-9]*) x= ;; esac
  printf 'exited%s\n' "${x:+ $x}"
  tail -n 20 -- "$d/server.log" 2>/dev/null | while IFS= read -r l || [ -n "$l" ]; do
    printf 'log: %s\n' "$l"
  done || :
  exit "$launch_failed"
}
