# Sourced by tests/wheel_in_debian_root.sh and tests/aarch64_emulated.sh: sets $zig_py to a Python
# with the wheel's build requirements (ziglang, setuptools) and numpy. The test environment's own
# when it has them (the README's test command installs them), else a venv kept in the cache at a
# fixed path. Either way zig's cache (~/.cache/zig), which keys on zig's path, is reused across
# runs (pip's isolated build env has a new path each time: ~2 min more per run).
# Needs: $PYTHON, $cache, and fail() from the sourcing script.
ZIGLANG=${ZIGLANG:-0.17.1}
NUMPY=${NUMPY:-2.2.6}
SETUPTOOLS=${SETUPTOOLS:-80.9.0}
if "$PYTHON" -c "import ziglang, numpy, setuptools" 2>/dev/null; then
    zig_py=$("$PYTHON" -c "import sys; print(sys.executable)")
else
    zig_venv=$cache/build-venv-zig$ZIGLANG-numpy$NUMPY
    if [ ! -f "$zig_venv/.complete" ]; then
        echo "== making $zig_venv: ziglang==$ZIGLANG numpy==$NUMPY setuptools==$SETUPTOOLS"
        rm -rf "$zig_venv"
        "$PYTHON" -m venv "$zig_venv"
        "$zig_venv/bin/python" -m pip install -q --disable-pip-version-check "ziglang==$ZIGLANG" \
            "numpy==$NUMPY" "setuptools==$SETUPTOOLS" || fail "pip install into $zig_venv"
        touch "$zig_venv/.complete"
    fi
    zig_py=$zig_venv/bin/python
fi
