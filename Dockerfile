# meshgate: one image, every role; the role is the command (`proxy`, `ca serve`, `control-plane
# serve`, `redirect attach`, …).
#
#   docker build -t meshgate:local .                       # builds from source (needs a registry),
#                                                          # profile-guided (scripts/release-build.sh)
#   scripts/release-build.sh && docker build --target prebuilt \
#     --build-arg MESHGATE_BINARY=target/pgo/release/meshgate -t meshgate:local .
#                                                          # packs the profile-guided binary built here
#   cargo build --release --locked && \
#   docker build --target prebuilt -t meshgate:local .     # packs target/release/meshgate (no registry
#                                                          # needed beyond a local debian:bookworm-slim;
#                                                          # scripts/docker-base-image.sh makes one)
#
# The `prebuilt` stage comes before the Rust stage on purpose: the classic builder (no BuildKit)
# runs every stage up to --target, so it never needs the rust image. No `# syntax=` line: BuildKit
# would try to pull the frontend image.

ARG RUST_VERSION=1.95

# ---- runtime base: Debian slim, an unprivileged user, state directories it owns ----
FROM debian:bookworm-slim AS runtime-base
RUN useradd --system --uid 65532 --user-group --home-dir /var/lib/meshgate \
        --shell /usr/sbin/nologin meshgate \
    && mkdir -p /var/lib/meshgate/ca /var/lib/meshgate/bootstrap \
    && chown -R meshgate:meshgate /var/lib/meshgate
WORKDIR /var/lib/meshgate
# Non-root by default: only the redirect init step runs as root (with NET_ADMIN + SYS_ADMIN).
USER 65532:65532
# One HEALTHCHECK for every role: each role sets MESHGATE_HEALTH_URL (default: the sidecar's
# readiness on its loopback admin port). The image has no curl; `meshgate health` does the check.
ENV MESHGATE_HEALTH_URL=http://127.0.0.1:15000/ready
HEALTHCHECK --interval=5s --timeout=4s --start-period=5s --retries=6 \
    CMD ["/usr/local/bin/meshgate", "health"]
ENTRYPOINT ["/usr/local/bin/meshgate"]
CMD ["--help"]

# ---- prebuilt: a binary built outside (`--build-arg MESHGATE_BINARY=path/in/context`) ----
FROM runtime-base AS prebuilt
ARG MESHGATE_BINARY=target/release/meshgate
COPY ${MESHGATE_BINARY} /usr/local/bin/meshgate

# ---- build from source ----
FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang libbpf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The shipped binary: optimized with the committed execution profile (pgo/, BENCHMARKS.md
# "Profile-guided optimization").
RUN scripts/release-build.sh \
    && cp target/pgo/release/meshgate /usr/local/bin/meshgate

# ---- runtime (the default target) ----
FROM runtime-base AS runtime
COPY --from=build /usr/local/bin/meshgate /usr/local/bin/meshgate
