# Builds both binaries; the same image runs as producer or worker.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends g++ make cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates tini && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 cronpipe
COPY --from=build /src/target/release/producer /src/target/release/worker /usr/local/bin/
COPY examples/docker.toml /etc/cronpipe/cronpipe.toml
USER cronpipe
ENV CRONPIPE_CONFIG=/etc/cronpipe/cronpipe.toml
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["worker", "run"]
