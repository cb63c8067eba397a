# nsbridge container image.
#
#   docker build -t nsbridge .
#   docker run --env-file nightscout.env -p 8080:8080 nsbridge
#
# Two stages: a Rust toolchain builds the binary, a small Debian image runs it. The
# Dockerfile uses only classic instructions (no BuildKit-only syntax such as cache
# mounts), so it also builds with the legacy builder that docker-compose 1.x drives.

# The toolchain: the `mongodb` crate needs rustc 1.88 or newer. Bookworm, the same Debian
# release as the runtime stage, so the binary is linked against the glibc it will run on.
# Pin a digest as well (rust:1.90-slim-bookworm@sha256:...) for byte-for-byte rebuilds.
ARG RUST_VERSION=1.90
FROM rust:${RUST_VERSION}-slim-bookworm AS builder

WORKDIR /build

# Dependencies first, in a layer of their own: build the locked dependency graph against
# placeholder sources, so that editing the bridge's code rebuilds only the bridge crate
# and not the few hundred crates under it. The layer is reused while Cargo.toml and
# Cargo.lock stay the same. Afterwards the placeholder crate itself is forgotten (its
# artifacts and fingerprints), so the real sources below are always compiled, whatever
# their timestamps. (Should Cargo.toml ever declare targets by path — [[test]], [[bench]],
# [[example]] — they need placeholders here, and their files a place in the context.)
# The vendored, patched crates (vendor/README.md) are part of that dependency graph.
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/nsbridge* target/release/libnsbridge* \
        target/release/deps/nsbridge-* target/release/deps/libnsbridge-* \
        target/release/.fingerprint/nsbridge-*

# The real sources. .dockerignore keeps out everything the build does not read (tests,
# node_modules, target/, .git, and .env files holding secrets); src/ include_str!s files
# from config/ and static/, which therefore come along.
COPY . .
RUN cargo build --release --locked --bin nsbridge \
    && install -m 0755 target/release/nsbridge /usr/local/bin/nsbridge


# The runtime: glibc and nothing else is needed. TLS is rustls with compiled-in root
# certificates (webpki-roots), so no OpenSSL and no ca-certificates package; a private CA
# for MongoDB is given in the URI (tlsCAFile=) and mounted as a file.
FROM debian:bookworm-slim

# A fixed, unprivileged uid/gid, so that volume permissions and Kubernetes'
# runAsNonRoot/runAsUser can rely on it. No home directory, no login shell.
RUN groupadd --system --gid 10001 nsbridge \
    && useradd --system --uid 10001 --gid nsbridge --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin nsbridge \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/nsbridge

# The bridge's own state: its position in the change stream (one small JSON file per
# database), so that a restarted or upgraded bridge resumes where it stopped and clients
# that reconnect with `since` lose nothing. A volume, so that it outlives the container;
# the bridge still needs only read access to MongoDB.
ENV NSBRIDGE_STATE_DIR=/var/lib/nsbridge
VOLUME ["/var/lib/nsbridge"]

COPY --from=builder /usr/local/bin/nsbridge /usr/local/bin/nsbridge

LABEL org.opencontainers.image.title="nsbridge" \
      org.opencontainers.image.description="Nightscout APIv3 /storage Socket.IO channel, fed by MongoDB change streams" \
      org.opencontainers.image.licenses="AGPL-3.0-or-later"

# Numeric, so that runtimes can check it is not root without reading /etc/passwd.
USER 10001:10001

# The bridge's own port: Socket.IO (/socket.io/), /healthz, /readyz, /metrics and the
# live page. nsbridge never reads Nightscout's PORT, so Nightscout's env file can be
# passed in unchanged. Settings are read from the environment (Nightscout's variables
# and NSBRIDGE_*); a settings file is best given as NSBRIDGE_CONFIG rather than
# --config, so that the health check below, a separate process, reads it too.
ENV NSBRIDGE_LISTEN=0.0.0.0:8080
EXPOSE 8080

# The binary is its own health check: `nsbridge healthcheck` loads the same settings,
# GETs /readyz on the loopback address of the listen port and exits 0 only on a 200,
# i.e. while MongoDB is reachable and the change stream is open. No curl or shell is
# needed. Its own connect/read timeouts are 3 s, within --timeout. The start period
# covers connecting to MongoDB and opening the change stream.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["nsbridge", "healthcheck"]

# nsbridge runs as PID 1: it handles SIGTERM and SIGINT itself (disconnects clients,
# closes the change stream, exits within about 4 s, inside Docker's default 10 s stop
# timeout) and starts no child processes, so no init wrapper is needed.
# Arguments after the image name are subcommands: `check-config`, `healthcheck`.
ENTRYPOINT ["nsbridge"]
