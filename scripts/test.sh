#!/usr/bin/env bash
# README's test command: installs what the tests use on a Debian machine (apt-get, as root or
# with sudo), then runs every test of the workspace. Extra arguments go to `cargo test`.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh --test it sidecar_attacks
#
# The privileged suites (eBPF as root, the compose mesh on a Docker engine) skip loudly where
# they cannot run; EBPF_TESTS=require / COMPOSE_TESTS=require make a skip fail (CI sets both).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real clients and tools the tests drive: openssl and curl (TLS clients), iproute2 (network
# namespaces), python3 (a plain app in the eBPF test; python3-venv for the PyPI tool below);
# clang and libbpf-dev rebuild the eBPF programs (without them the prebuilt object is used);
# iptables plays kube-proxy in the Kubernetes pod emulation (tests/it/kube_pods.rs).
packages=(openssl curl ca-certificates iproute2 iptables python3 python3-venv clang libbpf-dev chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -eq 0 ]; then
    sudo_cmd=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "the tests need: ${missing[*]}; install them (apt-get install ${missing[*]}) or run this as root" >&2
    exit 1
  fi
  echo "== installing: ${missing[*]}"
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# kubernetes-validate (PyPI, pinned; it ships the Kubernetes OpenAPI schemas and works offline):
# strict validation of what `meshgate install` and `meshgate inject` print
# (tests/it/kube_install.rs, which fails without it). Kept in a venv outside the repository.
kv_version=1.37.0
venv="${MESHGATE_TOOLS_VENV:-$HOME/.cache/meshgate/venv}"
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" != "$kv_version" ]; then
  echo "== installing kubernetes-validate $kv_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "kubernetes-validate==$kv_version"
fi
export KUBERNETES_VALIDATE="$venv/bin/kubernetes-validate"

exec cargo test --workspace "$@"
