# Stand-ins for the public images compose.yaml pulls (postgres:16, redis:7, registry:2), for
# machines that cannot pull: one image with Debian's packages of the three servers, on the
# offline-built test base. tests/support/compose.standins.yaml runs each service from it.
ARG BASE_IMAGE=mlflow-dock-test-base:bookworm-py3.11
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# No init system in a build: keep maintainer scripts from starting daemons, and skip the
# "main" cluster postgresql-common would create (the entrypoint makes its own in the volume).
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && mkdir -p /etc/postgresql-common/createcluster.d \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/00-standin.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql redis-server docker-registry \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)" /usr/local/lib/pgbin \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres -m 2775 /var/run/postgresql \
 && install -d -o redis -g redis -m 0750 /data \
 && install -d -m 0755 /var/lib/registry
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
COPY registry.yml /etc/docker/registry/standin.yml
