#!/usr/bin/env bash
# Debian packages that the C export's tests (tests/test_export_c.py) build and run with: a Cortex-M7
# cross-compiler, a 32-bit ARM Linux cross-compiler with its static libc, and qemu-arm; and chromium, the
# headless browser that tests/test_plots_offline.py opens the `dvc plots show` page in; PostgreSQL, the
# backend store of the team tracking server that tests/test_team_server.py starts; and Fashion-MNIST, the
# dataset package tests/test_fashion_mnist.py loads in full (31 MB). Installs only what
# is missing, and only as root with apt-get; otherwise it says why it skipped (those tests then skip,
# naming the tool). `make test` (and so .ci/run) calls it.
set -euo pipefail

probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
printf '#include <stdint.h>\nint main(void) { return (int)UINT8_C(0); }\n' > "$probe_dir/probe.c"

# Probing by compiling, not by package name: a tool on PATH from elsewhere counts, and the armhf C library
# is only a "Recommends" of its compiler, which --no-install-recommends leaves out.
missing=()
command -v make > /dev/null || missing+=(make)
command -v cc > /dev/null || missing+=(gcc libc6-dev)
# The Cortex-M7 build is freestanding (bnn_model.c needs only the compiler's own headers), so no newlib:
# it would be the largest download here (45 MB, 370 MB unpacked).
command -v arm-none-eabi-gcc > /dev/null || missing+=(gcc-arm-none-eabi)
if ! command -v arm-linux-gnueabihf-gcc > /dev/null; then
    missing+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
elif ! arm-linux-gnueabihf-gcc -static -o "$probe_dir/armhf" "$probe_dir/probe.c" 2> /dev/null; then
    missing+=(libc6-dev-armhf-cross)
fi
command -v qemu-arm > /dev/null || missing+=(qemu-user)
command -v chromium > /dev/null || missing+=(chromium)
# Debian keeps initdb and pg_ctl out of PATH, under /usr/lib/postgresql/<major>/bin; the test starts its own
# server from there (as an unprivileged user), so the package's own cluster and service are not used.
command -v initdb > /dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || missing+=(postgresql)
# The folder pipeline.sources.FASHION_MNIST_DEBIAN_DIR reads (data=fashion_mnist without data.path).
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || missing+=(dataset-fashion-mnist)

if [ ${#missing[@]} -eq 0 ]; then
    echo "system_deps: make, cc, arm-none-eabi-gcc, arm-linux-gnueabihf-gcc (+libc), qemu-arm, chromium, postgresql, fashion-mnist: all present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "system_deps: skipped, not root; missing Debian packages: ${missing[*]} (the tests that need them will skip)"
    exit 0
fi
if ! command -v apt-get > /dev/null; then
    echo "system_deps: skipped, no apt-get; missing Debian packages: ${missing[*]} (the tests that need them will skip)"
    exit 0
fi
echo "system_deps: installing ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
