# meshgate's eBPF local acceleration for a bench (sourced by run.sh and pair.sh, not run): the
# app and the client in one cgroup, the sidecars (or a peer's proxies, as a control) in another,
# and `meshgate redirect attach` on them with loopback exempt and no egress enforcement, so that
# nothing is redirected and only the local hops (client → outbound listener, inbound proxy → app
# port) pass socket to socket (docs/operations.md, "Local acceleration").
# Needs: $mg. Defines:
#   accel_unavailable        prints why it cannot run here (and returns 0), or returns 1
#   accel_setup NAME OUT IN APP   creates <cgroup2>/NAME/{app,sidecar} and attaches; sets
#                            in_app_cg and in_sidecar_cg: command prefixes that run a command
#                            (exec'd, same PID) in the app's / the sidecars' cgroup
#   accel_cleanup            detaches and removes the cgroups (after their processes stopped)
cgroup2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
accel_dir=
in_app_cg=()
in_sidecar_cg=()

accel_unavailable() {
  if [ "$(id -u)" != 0 ]; then echo "needs root (loading eBPF programs)"; return 0; fi
  if [ -z "$cgroup2" ]; then echo "no cgroup2 mount"; return 0; fi
  if ! "$mg" redirect attach --help 2>/dev/null | grep -q -- --no-local-accel; then
    echo "this meshgate has no local acceleration (redirect attach --no-local-accel)"; return 0
  fi
  return 1
}

accel_setup() { # NAME OUTBOUND_PORT INBOUND_PORT APP_PORT
  accel_dir=$cgroup2/$1
  mkdir -p "$accel_dir/app" "$accel_dir/sidecar"
  local out
  out=$("$mg" redirect attach --cgroup "$accel_dir/app" --sidecar-cgroup "$accel_dir/sidecar" \
    --outbound-port "$2" --inbound-port "$3" --app-ports "$4" --no-egress-enforce 2>&1) || {
    echo "error: meshgate redirect attach failed: $(printf '%s\n' "$out" | tail -1)" >&2
    return 1
  }
  # shellcheck disable=SC2016 # $$ and $0 belong to the inner shell
  in_app_cg=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$accel_dir/app")
  # shellcheck disable=SC2016
  in_sidecar_cg=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$accel_dir/sidecar")
}

accel_cleanup() {
  [ -n "$accel_dir" ] || return 0
  "$mg" redirect detach --cgroup "$accel_dir/app" >/dev/null 2>&1 || true
  rmdir "$accel_dir/app" "$accel_dir/sidecar" "$accel_dir" 2>/dev/null || true
  accel_dir=
}

# The acceleration counters of the attachment (sockets, refused, messages, fallback).
accel_counters() {
  "$mg" redirect status --cgroup "$accel_dir/app" 2>/dev/null | awk '/accel_/ {printf "%s=%s ", $1, $2}'
}
