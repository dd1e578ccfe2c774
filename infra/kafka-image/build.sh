#!/usr/bin/env bash
# Build the broker image specstream-kafka:<version> (the version of pipeline/transport/kafka_jars)
# with no registry: a base image imported from a JRE cut down from the host JDK with jlink (plus the
# shared libraries it links, a POSIX shell and mkdir), then Dockerfile over it with the broker jars
# of `specstream broker install` and entrypoint.sh. Compose and Kubernetes use the same image.
#
# Environment: PYTHON (python3; the one with specstream installed), BASE_IMAGE (skip the jlink base
# and build FROM this image instead, e.g. eclipse-temurin:17-jre where a registry is reachable),
# IMAGE (the tag; default specstream-kafka:<version>). Needs `docker` (DOCKER_HOST from engine.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"

read -r version libs < <("$PYTHON" -c \
    'from pipeline.transport import kafka_jars as k; print(k.KAFKA_VERSION, k.libs_dir())')
image="${IMAGE:-specstream-kafka:$version}"
[ -f "$libs/kafka_2.13-$version.jar" ] || {
    echo "build: error: no broker jars in $libs: run \`specstream broker install\` first" >&2; exit 1; }
started=$SECONDS
work="$(mktemp -d /tmp/specstream-image.XXXXXX)"
trap 'rm -rf "$work"' EXIT

base="${BASE_IMAGE:-}"
if [ -z "$base" ]; then
    root="$work/root"
    # A fixed module list: `jdeps --print-module-deps` over the Kafka jars fails (org.slf4j not found).
    jlink --add-modules java.se,jdk.unsupported,jdk.crypto.ec,jdk.management,jdk.zipfs,jdk.naming.dns \
        --strip-debug --no-man-pages --no-header-files --compress=2 --output "$root/opt/java"
    mkdir -p "$root/bin" "$root/etc" "$root/tmp"
    chmod 1777 "$root/tmp"
    cp /bin/dash "$root/bin/sh"
    cp "$(command -v mkdir)" "$root/bin/mkdir"
    # The shared libraries the JRE, the shell and mkdir link (ldd closure), at their host paths.
    elves="$(find "$root" -type f \( -name '*.so' -o -perm -u+x \) -exec sh -c \
        'for f; do head -c4 "$f" | grep -q ELF && echo "$f"; done' sh {} +)"
    for lib in $(for f in $elves; do ldd "$f" 2>/dev/null; done \
            | grep -o '/[^ ]*' | grep -v "^$root" | sort -u); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nkafka:x:1000:1000:kafka:/tmp:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\nkafka:x:1000:\n' >"$root/etc/group"
    base="specstream-jre:$version"
    tar -C "$root" --numeric-owner --owner=0 --group=0 -cf - . | docker import \
        --change 'ENV PATH=/opt/java/bin:/bin JAVA_HOME=/opt/java' - "$base" >/dev/null
fi

context="$work/context"
mkdir -p "$context/data"
cp -rL "$libs" "$context/libs"
cp "$here/entrypoint.sh" "$context/entrypoint.sh"
chmod 0755 "$context/entrypoint.sh"
# The classic builder: BuildKit needs the buildx component, which Debian's docker.io lacks.
# (its deprecation notice is dropped; the build's own errors are shown)
if ! DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$base" -t "$image" -f "$here/Dockerfile" \
        "$context" >"$work/build.log" 2>&1; then
    grep -v -e DEPRECATED -e 'BuildKit is currently' -e 'environment-variable' "$work/build.log" >&2
    exit 1
fi
size="$(docker image inspect --format '{{.Size}}' "$image")"
echo "image: $image $(docker image inspect --format '{{.Id}}' "$image" | cut -c1-19)" \
    "$((size / 1000000)) MB (base $base), built in $((SECONDS - started)) s"
