# keycloak-notifier: a static musl binary in an otherwise empty image.
#
#   docker build -t keycloak-notifier .
#
# Without a registry (as in this repository's own tests), scripts/image builds
# the binary on the host and swaps the build stage for a local folder with
# `podman build --build-context build=DIR`; the final stage is the same.

FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
ENV CC_x86_64_unknown_linux_musl=musl-gcc
RUN cargo build --locked --release --target x86_64-unknown-linux-musl \
 && mkdir -p /out/data \
 && cp target/x86_64-unknown-linux-musl/release/keycloak-notifier /out/keycloak-notifier

FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="keycloak-notifier" \
      org.opencontainers.image.description="Mails administrators about new Keycloak events (registrations, failed logins, ...)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The bundled Mozilla roots mean no CA bundle is needed; an internal CA is
# mounted and named by KEYCLOAK_CA_FILE / SMTP_CA_FILE.
COPY --from=build /out/keycloak-notifier /keycloak-notifier
COPY --from=build --chown=65534:65534 /out/data /data
ENV NOTIFIER_STATE_DIR=/data \
    NOTIFIER_HTTP_ADDR=0.0.0.0:8080
VOLUME ["/data"]
# /healthz, /readyz and /metrics.
EXPOSE 8080
USER 65534:65534
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/keycloak-notifier", "healthcheck"]
ENTRYPOINT ["/keycloak-notifier"]
CMD ["run"]
