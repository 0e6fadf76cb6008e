# shellcheck shell=sh
# The facts: everything a host choice needs, in one exec per host.
#
# Gets, from the preamble (src/plan/hosts.rs): `run_marker` (the marker a
# wrapper's argv carries, `ssh-spawner-run:`), `run_pattern` (a pattern for
# it that does not match itself), `check_command` (1: also
# report whether `command` is found after the prologue), `command` (the
# server's program), `tcp_mark` (the line before /proc/net/tcp*),
# `gpu_query` and `app_query` (nvidia-smi's query fields), `gpu_timeout`
# (seconds per nvidia-smi call), and the function `ssp_prologue` (the
# admin's prologue lines).
#
# Prints `key=value` lines (hostname, home, uid, mem_total_kb,
# mem_available_kb, cpus, load1, boot_id, servers, systemd_user, prlimit,
# default_signal, and command when asked; then nvidia_smi and its lines:
# see src/plan/gpus.rs), then `$tcp_mark` and the contents of
# /proc/net/tcp and tcp6; exits 0.
#
# The preamble's values: read with `$`, as the shell has no other way.
# shellcheck disable=SC2154
set -u
LC_ALL=C; export LC_ALL
printf 'hostname=%s\n' "$(cat /proc/sys/kernel/hostname)"
printf 'home=%s\n' "$HOME"
printf 'uid=%s\n' "$(id -u)"
while read -r k v _; do
  case $k in
    MemTotal:) printf 'mem_total_kb=%s\n' "$v" ;;
    MemAvailable:) printf 'mem_available_kb=%s\n' "$v" ;;
  esac
done < /proc/meminfo
printf 'cpus=%s\n' "$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc)"
read -r l1 _ < /proc/loadavg; printf 'load1=%s\n' "$l1"
printf 'boot_id=%s\n' "$(cat /proc/sys/kernel/random/boot_id)"
# The servers: runs whose wrapper runs, each counted once (a launch leading
# its group has the argv of its wrapper, which is its subshell). A wrapper
# is a process whose argv is exactly `/bin/sh -s MARKER [DIR]` or `/bin/sh
# -c CODE MARKER DIR ARGV...`, MARKER `$run_marker` and a run id; a marker
# anywhere else in any user's argv (`sleep 9 ssh-spawner-run:x`) is not a
# server. `pgrep` finds the candidates; each one's argv is read with NULs
# as newlines (and its own newlines as \001, so CODE is one line).
servers=$(
  for q in $(pgrep -f "$run_pattern" 2>/dev/null); do
    tr '\000\n' '\n\001' <"/proc/$q/cmdline" 2>/dev/null | {
      IFS= read -r a0 && IFS= read -r a1 && IFS= read -r a2 || exit 0
      IFS= read -r a3 || a3=''
      IFS= read -r a4 || a4=''
      case $a0:$a1 in
        /bin/sh:-s) [ -z "$a4" ] || exit 0; m=$a2 ;;
        /bin/sh:-c) [ -n "$a4" ] || exit 0; m=$a3 ;;
        *) exit 0 ;;
      esac
      case $m in "$run_marker"?*) r=${m#"$run_marker"} ;; *) exit 0 ;; esac
      case $r in *[!a-z0-9-]*) exit 0 ;; esac
      echo "$r"
    }
  done | sort -u | wc -l
)
printf 'servers=%s\n' "$((${servers:-0}))"
if command -v systemd-run >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then
  echo systemd_user=yes; else echo systemd_user=no; fi
if command -v prlimit >/dev/null 2>&1; then echo prlimit=yes; else echo prlimit=no; fi
if env --default-signal=INT,QUIT true >/dev/null 2>&1; then echo default_signal=yes; else echo default_signal=no; fi
# command_found PROGRAM: whether PROGRAM is found once the prologue ran (in
# a subshell: nothing it does stays); the prologue is a function, so it
# cannot change PROGRAM.
command_found() {
  (
    ssp_prologue
    command -v "$1"
  ) >/dev/null 2>&1
}
if [ "$check_command" = 1 ]; then
  if command_found "$command"; then echo command=yes; else echo command=no; fi
fi
# GPUs: `nvidia_smi=none` without nvidia-smi; else each line of the two
# queries as `gpu=` and `gpu_app=`, after `nvidia_smi=ok`; or, when a query
# fails, `nvidia_smi=failed QUERY STATUS` and the first lines it printed.
# Bounded by `timeout` where there is one: a wedged driver hangs nvidia-smi.
smi() {
  if command -v timeout >/dev/null 2>&1; then
    timeout -k 2 "$gpu_timeout" nvidia-smi "$@"
  else
    nvidia-smi "$@"
  fi
}
# smi_lines KEY TEXT: each non-empty line of TEXT as KEY=LINE.
smi_lines() {
  printf '%s\n' "$2" | while IFS= read -r line; do
    if [ -n "$line" ]; then printf '%s=%s\n' "$1" "$line"; fi
  done
}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo nvidia_smi=none
else
  rc=0
  gpus=$(smi --query-gpu="$gpu_query" --format=csv,noheader,nounits 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then
    echo "nvidia_smi=failed query-gpu $rc"
    smi_lines nvidia_smi_said "$(printf '%s\n' "$gpus" | head -n 5)"
  else
    apps=$(smi --query-compute-apps="$app_query" --format=csv,noheader,nounits 2>&1) || rc=$?
    if [ "$rc" != 0 ]; then
      echo "nvidia_smi=failed query-compute-apps $rc"
      smi_lines nvidia_smi_said "$(printf '%s\n' "$apps" | head -n 5)"
    else
      echo nvidia_smi=ok
      smi_lines gpu "$gpus"
      smi_lines gpu_app "$apps"
    fi
  fi
fi
echo "$tcp_mark"
cat /proc/net/tcp /proc/net/tcp6 2>/dev/null
