# Multi-stage build: compile in the Rust image, run from a small Debian
# image as a non-root user. Build:  docker build -t pgheal .
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY protocol protocol
COPY proxy proxy
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bin pgheal \
    && strip target/release/pgheal

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgheal
COPY --from=build /src/target/release/pgheal /usr/local/bin/pgheal
USER 10001
EXPOSE 6432 9930
ENV PGHEAL_CONFIG=/etc/pgheal/pgheal.toml
ENTRYPOINT ["/usr/local/bin/pgheal", "--log-format", "json"]
