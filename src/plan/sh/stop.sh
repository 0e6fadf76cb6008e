# shellcheck shell=sh
# The stop: ends one server and everything it started, then removes its
# directory.
#
# Gets, from the preamble (src/plan/stop.rs): `pid`, `pgid`, `start`, `uid`,
# `boot_id` (as the launch recorded them), `d` (the server directory),
# `grace` (seconds between TERM and KILL), `keep` (1: keep `server.log` and
# `exit_status`), `env_marker` (`SSH_SPAWNER_RUN=RUN_ID`, as in the run's
# processes' environment) and `unit` (the systemd scope a launch with
# systemd limits ran in); and lib.sh's helpers.
#
# It signals nothing unless the recorded pid is verified to be ours
# (same_process: same boot, same start time, same real uid, not a zombie).
# The wrapper counts as ours when it is the server's parent, alive, has our
# uid and is in the recorded group (which it leads, or which the launch's
# login led), or when it is the recorded group's leader and the server's
# parent or group. Then it collects every descendant (walking ppid links,
# since kernels and other children may have called setsid and left the
# group) and every member of the group, sends TERM to the group and to each
# of them, waits up to `grace` seconds for all to be gone, then sends KILL
# to what remains and waits up to about 5 s more. Each pid is re-checked
# against its start time just before it is signalled, and the group is
# signalled only while a process verified as ours is in it.
#
# Prints `killed`, `killed escalated` or `gone` (nothing of ours was
# running) and exits 0, after removing the server directory, or when `keep`
# everything in it except `server.log` and `exit_status` (certificates
# included). If something survives SIGKILL it prints the survivors on
# stderr, leaves the directory alone and exits 1.
#
# The preamble's values: read with `$`, as the shell has no other way; and
# `A && B || continue` means "skip unless both hold", as meant:
# shellcheck disable=SC2154,SC2015
set -u
umask 077
# remove_dir: the server directory, or all in it but the log and the status.
remove_dir() {
  [ -d "$d" ] || return 0
  if [ "$keep" = 1 ]; then
    for f in "$d"/* "$d"/.[!.]* "$d"/..?*; do
      case ${f##*/} in server.log|exit_status) continue ;; esac
      if [ -e "$f" ] || [ -L "$f" ]; then rm -rf -- "$f" || :; fi
    done
  else
    rm -rf -- "$d" || :
  fi
}
# snapshot_procs: the process table into `snapshot`, a line `PID PPID PGID`
# (from `ps`) or `PID PPID PGID START` (from /proc) per process.
# The process table comes from `ps` (one program, reading /proc in C) when
# the host has a POSIX one that prints only numbers for these columns;
# otherwise from /proc with the `read` builtin, which takes a system call
# per byte: about 300 per process, every turn of the wait, which on a host
# with hundreds of processes was most of a stop. With `ps` the start time
# (the proof a pid was not reused) is read only for the run's own
# processes and their children.
snapshot_procs() {
  snapshot=''
  if [ -n "$use_ps" ] && snapshot=$(ps -e -o pid= -o ppid= -o pgid= 2>/dev/null); then
    case $snapshot in *[!0-9\ $nl]*|'') ;; *) return 0 ;; esac
  fi
  if [ -n "$use_ps" ]; then
    use_ps=''
    echo "ssh-spawner stop: ps gave no usable process table; reading /proc" >&2
  fi
  snapshot=''
  for f in /proc/[0-9]*; do
    q=${f#/proc/}
    read_stat "$q" && is_live || continue
    snapshot="$snapshot$q $s_ppid $s_pgrp $s_start$nl"
  done
}
# start_time_of PID START: PID's start time into `g_start`: START, or when
# that is `-` (not in the snapshot) read now; false when PID is gone.
start_time_of() {
  g_start=$2
  if [ "$g_start" = - ]; then read_stat "$1" && is_live || return 1; g_start=$s_start; fi
}
# in_tree PID START: whether PID, with that start time, is in `tree` (the
# ` PID:START ` list of the run's processes).
in_tree() {
  case $tree in *" $1:"*) ;; *) return 1 ;; esac
  start_time_of "$1" "$2" || return 1
  case $tree in *" $1:$g_start "*) ;; *) return 1 ;; esac
}
# scan_tree: adds to `tree` every descendant of its processes and, while
# one of them is in the recorded group, every member of the group; sets
# `alive` (` PID:START` of each that is still there), `n` (how many) and
# `in_group` (1: a process of the tree is in the group).
scan_tree() {
  snapshot_procs
  in_group=0
  more=1
  while [ "$more" = 1 ]; do
    more=0
    mine=' '
    set -f
    IFS=$nl
    for ln in $snapshot; do
      IFS=' '
      # Split on purpose: the line's fields.
      # shellcheck disable=SC2086
      set -- $ln -
      if in_tree "$1" "$4"; then
        mine="$mine$1 "
        [ "$3" != "$pgid" ] || in_group=1
      fi
    done
    IFS=$nl
    for ln in $snapshot; do
      IFS=' '
      # shellcheck disable=SC2086
      set -- $ln -
      case $mine in *" $1 "*) continue ;; esac
      case $mine in *" $2 "*) ;; *) [ "$in_group" = 1 ] && [ "$3" = "$pgid" ] || continue ;; esac
      if start_time_of "$1" "$4"; then tree="$tree$1:$g_start "; more=1; fi
    done
    IFS=$dfl
    set +f
  done
  alive=''
  n=0
  set -f
  IFS=$nl
  for ln in $snapshot; do
    IFS=' '
    # shellcheck disable=SC2086
    set -- $ln -
    if in_tree "$1" "$4"; then alive="$alive $1:$g_start"; n=$((n + 1)); fi
  done
  IFS=$dfl
  set +f
}
# signal_all SIGNAL: the scope, the group (while ours is in it) and each
# process of `alive` still started at its recorded time.
signal_all() {
  if [ -n "$in_scope" ]; then systemctl --user kill --signal="$1" -- "$unit" >/dev/null 2>&1 || :; fi
  if [ "$in_group" = 1 ]; then kill -s "$1" -- "-$pgid" 2>/dev/null || :; fi
  for e in $alive; do
    q=${e%%:*}
    if read_stat "$q" && [ "$s_start" = "${e#*:}" ]; then kill -s "$1" "$q" 2>/dev/null || :; fi
  done
}
use_ps=''
if command -v ps >/dev/null 2>&1; then use_ps=1; fi
tree=' '
read_boot_id
# Only the login's own processes are ever signalled: a state (forged, or
# corrupted) whose uid is another user's matches nothing.
read_login_uid
ours=''
if [ "$boot" = "$boot_id" ] && [ "$uid" = "$login_uid" ]; then ours=1; fi
if same_process "$pid" "$start" "$uid" "$boot_id"; then
  tree=" $pid:$start "
  c_ppid=$s_ppid c_pgrp=$s_pgrp
  if [ "$c_ppid" = "$pgid" ] || [ "$c_pgrp" = "$pgid" ]; then
    if read_stat "$pgid" && is_live && [ "$s_pgrp" = "$pgid" ] && read_uid "$pgid" && [ "$s_uid" = "$uid" ]; then
      tree="$tree$pgid:$s_start "
    fi
  fi
  # The wrapper, when it is a member of the group rather than its leader
  # (the launch's login led the group and is gone): the server's parent,
  # in the server's group, ours.
  if [ "$c_pgrp" = "$pgid" ] && [ "$c_ppid" -gt 1 ] && [ "$c_ppid" != "$pgid" ]; then
    if read_stat "$c_ppid" && is_live && [ "$s_pgrp" = "$pgid" ] && read_uid "$c_ppid" && [ "$s_uid" = "$uid" ]; then
      tree="$tree$c_ppid:$s_start "
    fi
  fi
fi
# Processes of ours that carry this run's marker in their environment:
# kernels and helpers of a server that has already died (their parent is
# gone, so the tree above cannot reach them) are found this way.
# One `grep -z` reads every environment we may read (GNU and busybox grep
# take -z); without it, a `tr | grep` per process of ours.
if [ -n "$ours" ]; then
  if printf 'x\0' | grep -qzxF x 2>/dev/null; then
    envs=$(grep -lzxF "$env_marker" /proc/[0-9]*/environ 2>/dev/null) || :
    set -f
    for f in $envs; do
      q=${f#/proc/}
      q=${q%/environ}
      case $q in ''|*[!0-9]*) continue ;; esac
      [ "$q" != "$$" ] || continue
      read_uid "$q" && [ "$s_uid" = "$uid" ] || continue
      read_stat "$q" && is_live || continue
      case $tree in *" $q:$s_start "*) continue ;; esac
      tree="$tree$q:$s_start "
    done
    set +f
  else
    for f in /proc/[0-9]*; do
      q=${f#/proc/}
      [ "$q" != "$$" ] || continue
      # Only a process whose /proc entry is ours has an environment we may
      # read: one stat, instead of reading its status, for everyone else's.
      [ -O "$f" ] || continue
      read_uid "$q" && [ "$s_uid" = "$uid" ] || continue
      read_stat "$q" && is_live || continue
      case $tree in *" $q:$s_start "*) continue ;; esac
      if tr '\0' '\n' < "$f/environ" 2>/dev/null | grep -qxF "$env_marker"; then
        read_stat "$q" && tree="$tree$q:$s_start "
      fi
    done
  fi
fi
# A server started in a systemd scope (enforcement = systemd): everything in
# the scope is the run's, including processes that left the process group
# and dropped the marker; the scope is signalled with the rest and waited
# for until its cgroup is empty (not until systemd calls it inactive: a
# user manager on cgroup v1 may not hear that a scope emptied).
in_scope=''
scope_procs=''
if [ -n "$ours" ] && command -v systemctl >/dev/null 2>&1 &&
  systemctl --user is-active --quiet -- "$unit" 2>/dev/null; then
  in_scope=1
  cg=$(systemctl --user show -p ControlGroup --value -- "$unit" 2>/dev/null) || cg=''
  case $cg in
    /*)
      for f in "/sys/fs/cgroup/systemd$cg/cgroup.procs" "/sys/fs/cgroup$cg/cgroup.procs"; do
        if [ -r "$f" ]; then scope_procs=$f; break; fi
      done ;;
  esac
fi
# scope_busy: whether a process is left in the scope.
scope_busy() {
  if [ -n "$scope_procs" ]; then
    { IFS= read -r _x <"$scope_procs"; } 2>/dev/null
  else
    systemctl --user is-active --quiet -- "$unit" 2>/dev/null
  fi
}
# TERM goes only to what was there at first: the wrapper spawns `mv` to
# record the exit status once the server is gone, and TERMing that would
# lose the status. Latecomers are still waited for and get KILL if they
# outlast the grace period.
# Nothing of the tree yet: a stop that finds only the scope (the recorded
# pid gone, the scope still running what the server left) signals the scope
# alone, with `set -u` in force.
n=0 in_group=0 alive=''
if [ "$tree" != ' ' ]; then scan_tree; fi
if [ "$n" = 0 ] && [ -z "$in_scope" ]; then
  echo gone
  remove_dir
  exit 0
fi
# Each wait ends by the host's clock (read_uptime), not after a number of
# turns: on a loaded host a turn takes far longer than its `sleep 0.1`, and
# the hub gives the whole stop `command_timeout` plus the grace.
# until_in CS: the wait that begins now ends CS centiseconds later (`end`);
# before: whether it has not ended yet.
until_in() {
  read_uptime
  end=$((now + $1))
}
before() {
  read_uptime
  [ "$now" -lt "$end" ]
}
signal_all TERM
until_in "$((grace * 100))"
while before; do
  sleep 0.1
  scan_tree
  [ "$n" != 0 ] || break
done
escalated=''
if [ "$n" != 0 ]; then
  escalated=1
  until_in 500
  while [ "$n" != 0 ] && before; do
    signal_all KILL
    sleep 0.1
    scan_tree
  done
fi
if [ -n "$in_scope" ]; then
  until_in "$((grace * 100))"
  while scope_busy && before; do
    sleep 0.1
  done
  until_in 500
  while scope_busy && before; do
    escalated=1
    systemctl --user kill --signal=KILL -- "$unit" >/dev/null 2>&1 || :
    sleep 0.1
  done
  if scope_busy; then
    echo "ssh-spawner stop: processes left in systemd scope $unit after SIGKILL" >&2
    exit 1
  fi
  # Empty: have systemd drop the unit and its cgroups now.
  systemctl --user stop -- "$unit" >/dev/null 2>&1 || :
fi
if [ "$n" != 0 ]; then
  echo "ssh-spawner stop: still running after SIGKILL (pid:start):$alive" >&2
  exit 1
fi
echo "killed${escalated:+ escalated}"
remove_dir
exit 0
