#!/usr/bin/env bash
# An aarch64 Python that runs under qemu-user on this x86 host, for the test that runs a
# cross-built tvm-aarch64 artifact with pared's own Executor (tests/backends/test_tvm_aarch64.py).
#
#   tests/support/aarch64_env.sh OUT VENV_PYTHON
#
# Needs root (apt): installs Debian's qemu-user and gcc-aarch64-linux-gnu (the cross linker
# pared's tvm-aarch64 target links with), adds the arm64 architecture to apt, downloads Debian 12's
# arm64 python3.11 and the libraries it loads and unpacks them into OUT/root (dpkg -x: nothing is
# installed for arm64), and unpacks the aarch64 wheels of what pared's torch-free Executor imports
# (numpy, TVM and its FFI at the versions VENV_PYTHON has, ml_dtypes, typing_extensions, PyYAML) into
# OUT/site. Run it as: qemu-aarch64 -L OUT/root OUT/root/usr/bin/python3.11 (PYTHONPATH=OUT/site:repo).
# Writes OUT/.ready last; a second run with it present does nothing.
set -euo pipefail
out=$1
py=$2
[ -f "$out/.ready" ] && exit 0
export DEBIAN_FRONTEND=noninteractive
# apt and dpkg one at a time: `make -j` may run this beside the browser target's apt-get
lock=${PARED_APT_LOCK:-/tmp/pared-apt.lock}
apt_get() { flock "$lock" apt-get "$@"; }
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    apt_get update -qq
    apt_get install -y -qq qemu-user gcc-aarch64-linux-gnu >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    flock "$lock" dpkg --add-architecture arm64
fi
apt_get update -qq
rm -rf "$out" && mkdir -p "$out/debs" "$out/root" "$out/site" "$out/wheels"
(cd "$out/debs" && apt_get download -qq \
    libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 libgomp1:arm64 python3.11-minimal:arm64 \
    libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 \
    libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libcrypt1:arm64 libuuid1:arm64 libtinfo6:arm64 \
    libncursesw6:arm64 libsqlite3-0:arm64 libreadline8:arm64 libnsl2:arm64 libtirpc3:arm64 libdb5.3:arm64 \
    2>/dev/null)
for d in "$out"/debs/*.deb; do dpkg -x "$d" "$out/root"; done
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$py" -m pip download -q --only-binary=:all: --no-deps --python-version 3.11 -d "$out/wheels" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_24_aarch64 \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    "numpy==$(ver numpy)" "apache-tvm==$(ver apache-tvm)" "apache-tvm-ffi==$(ver apache-tvm-ffi)" \
    ml_dtypes typing_extensions pyyaml
for w in "$out"/wheels/*.whl; do "$py" -m zipfile -e "$w" "$out/site"; done
rm -rf "$out/debs" "$out/wheels"
touch "$out/.ready"
echo "aarch64 Python for qemu-user ready in $out"
