# The Cohort worker in Prefect's image: Prefect's Python for the flows (a process pool's runs
# are `python -m prefect.engine` next to the worker), `cohort` as the entrypoint, a non-root
# user.
#
#   cargo build --release -p cohort
#   docker build --build-arg COHORT_BINARY=target/release/cohort -t cohort:latest .
#   docker run --rm -e PREFECT_API_URL=... cohort:latest worker start --pool my-pool
#
# The binary is built outside (no Rust toolchain in the image, nothing to pull but the base).
# PREFECT_IMAGE names the Prefect image whose Python and Prefect version the flows need.
ARG PREFECT_IMAGE=prefecthq/prefect:3.8.8-python3.11
FROM ${PREFECT_IMAGE}
ARG COHORT_BINARY=target/release/cohort
COPY ${COHORT_BINARY} /usr/local/bin/cohort
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/cohort cohort
USER 10001:10001
WORKDIR /home/cohort
ENV PREFECT_HOME=/home/cohort/.prefect
ENTRYPOINT ["cohort"]
CMD ["worker", "start", "--help"]
