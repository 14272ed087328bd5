# The two commands: `make demo` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pared-installed

.PHONY: demo demo-moe demo-minilm vla test test-heavy bench install clean browser cross

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build of 2.13.0 is served here; anything else
	# resolves to a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The Triton server of a partition's remote half (pared serve, backends/remote.py) runs in an
# environment of its own: nvidia-pytriton pins numpy < 2, which the rest of pared's stack (pandas 3,
# mlxtend) does not take. The server is torch-free: ONNX Runtime and pared's Executor.
SERVE := .venv-serve
SERVE_STAMP := $(SERVE)/.pared-installed

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE)/bin/python || $(PY) -m venv $(SERVE)
	$(SERVE)/bin/python -m pip install -q --upgrade pip
	$(SERVE)/bin/python -m pip install -q 'nvidia-pytriton>=0.7' 'onnxruntime>=1.22' 'pyyaml>=6' 'rich>=13' \
		'safetensors>=0.4' 'cryptography>=42'
	$(SERVE)/bin/python -m pip install -q --no-deps -e .
	touch $(SERVE_STAMP)

install: $(STAMP) $(SERVE_STAMP)

# `pared report`'s browser test renders its pages in Debian's chromium, driven by Playwright
# (whose own browser download cannot reach its host from these machines). Installed here where
# make runs as root, as CI does; elsewhere the test says what is missing and skips. Where chromium
# is there, the test must run: PARED_REQUIRE_BROWSER=1 turns a skip into a failure.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the report's browser test"; \
		flock /tmp/pared-apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null' \
			|| echo "pared: apt-get could not install chromium; the browser test will skip"; \
	else echo "pared: $(CHROMIUM) is missing and make is not root: the browser test of pared report will" \
		"skip (as root: apt-get install chromium)"; fi

# A cross-built tvm-aarch64 artifact is run by pared's own Executor in an aarch64 Python under
# qemu-user (tests/backends/test_tvm_aarch64.py): Debian's qemu-user and gcc-aarch64-linux-gnu, and
# Debian's arm64 python3.11 with the aarch64 wheels of numpy and TVM unpacked into build/aarch64
# (tests/support/aarch64_env.sh). Prepared here where make runs as root, as CI does; elsewhere the
# test says what is missing and skips; where it is prepared, PARED_REQUIRE_AARCH64=1 makes a skip fail.
AARCH64 := build/aarch64
cross: $(STAMP)
	@if [ -f $(AARCH64)/.ready ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "preparing an aarch64 Python under qemu-user for the tvm-aarch64 test"; \
		bash tests/support/aarch64_env.sh $(AARCH64) $(BIN)/python \
			|| echo "pared: preparing $(AARCH64) failed; the tvm-aarch64 test under qemu will skip"; \
	else echo "pared: make is not root: the test that runs a tvm-aarch64 artifact under qemu-aarch64 will" \
		"skip (as root: make cross)"; fi

# The trained DiT, cached across DDIM steps, sampled torch-free from its artifact.
demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python examples/dit_cache_demo.py

# The DiT-MoE cached per expert (expert_cache, MoECa), sampled the same way.
demo-moe: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python examples/dit_cache_demo.py --workload dit_moe_mnist

demo-minilm: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python examples/minilm_demo.py

# Closed-loop evaluation of the trained VLA (both action heads) on six Meta-World
# tasks (25 episodes each, ~10 min per head on one core): success, latency, action MSE.
vla: $(STAMP)
	MUJOCO_GL=egl OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python examples/vla_metaworld/evaluate.py --episodes 25
	MUJOCO_GL=egl OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python examples/vla_metaworld/evaluate.py --episodes 25 --head tokens

# Both test targets run on every core (pytest-xdist, at most 4 workers): a test file stays on
# one worker (its cached fixtures are built once); the heavy tests are spread one by one.
# Both share one ONNX export cache (PARED_EXPORT_CACHE, backends/onnxruntime/export_cache.py):
# the same graph is exported once per run of the suites, not once per test that lowers it.
# After each suite the cache's lookups so far are printed (hits, misses). The slowest tests start
# first (tests/conftest.py, from tests/durations.json; refresh it from --durations logs with
# tests/support/record_durations.py), so a long test does not start last (on this machine the heavy
# suite was not shorter for it: see stop 46's note). PARED_TEST_CPU_LOG=FILE records each test's
# wall and CPU time (tests/support/cpu_report.py FILE: the tests that leave a core idle).
EXPORT_CACHE := PARED_EXPORT_CACHE=$(CURDIR)/build/export-cache
test: $(STAMP) $(SERVE_STAMP) browser cross
	PARED_REQUIRE_BROWSER=$$(test -x $(CHROMIUM) && echo 1 || echo 0) \
	PARED_REQUIRE_AARCH64=$$(test -f $(AARCH64)/.ready && echo 1 || echo 0) \
	$(EXPORT_CACHE) MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q -n auto --maxprocesses 4 --dist loadfile tests
	@$(EXPORT_CACHE) $(BIN)/python -m pared.backends.onnxruntime.export_cache

# The heavier end-to-end checks (the composed pipelines on the trained workloads,
# sampled torch-free from their artifacts) and the MetaSchedule tuning tests; CI runs
# them after `make test`. The tuning tests run first, one at a time: beside the parallel
# run, MetaSchedule's builder timed out on every candidate and they skipped.
test-heavy: $(STAMP) $(SERVE_STAMP) browser cross
	$(EXPORT_CACHE) MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q -n 0 -m tuning tests
	PARED_REQUIRE_BROWSER=$$(test -x $(CHROMIUM) && echo 1 || echo 0) \
	PARED_REQUIRE_AARCH64=$$(test -f $(AARCH64)/.ready && echo 1 || echo 0) \
	$(EXPORT_CACHE) MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q -n auto --maxprocesses 4 --dist load -m "heavy and not tuning" tests
	@$(EXPORT_CACHE) $(BIN)/python -m pared.backends.onnxruntime.export_cache

# Every reference workload with its default pipeline (examples/pipelines/NAME.yaml):
# eager vs. plain lowering vs. the pipeline, side by side; JSON in benchmarks/results/.
# Each line gives the options of the committed result it rewrites (the JSON's "summary"
# and "repeats"), so a rerun never replaces a result with a smaller run: the two VLA
# results are 25 closed-loop episodes per task and head (the workload's default is 5).
BENCH := MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/pared bench --threads 1 --workload
bench: $(STAMP)
	$(BENCH) dit_mnist --json benchmarks/results/dit_mnist.json
	$(BENCH) dit_moe_mnist --json benchmarks/results/dit_moe_mnist.json
	$(BENCH) vit_mnist --json benchmarks/results/vit_mnist.json
	$(BENCH) minilm --repeats 7 --json benchmarks/results/minilm.json
	$(BENCH) vla_metaworld --head diffusion --episodes 25 --repeats 7 --json benchmarks/results/vla_metaworld.json
	$(BENCH) vla_metaworld --head tokens --episodes 25 --repeats 7 --json benchmarks/results/vla_metaworld_tokens.json
	# the per-call speed alone, alternated (run it on a quiet machine)
	MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/vla_speed.py --repeats 25
	# speculative decoding of the token head: closed loop, 25 episodes per task, and per-call timing
	MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/vla_speculative.py --episodes 25
	# action-head caching of the diffusion head (shipped and larger head): closed loop and timing
	MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/vla_action_cache.py --episodes 25
	MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/vla_action_cache.py --episodes 25 --policy large
	# the four embodied methods on one artifact (the diffusion head drafting for the token head)
	MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/vla_speculative.py --lossless exact_retrieval \
		exact_denoiser exact_denoiser4 --lossy r2_denoiser r2_denoiser4 four_composed four_composed_4 \
		composed_dq_first --json benchmarks/results/vla_four_composed.json
	$(BENCH) vla_metaworld --head tokens --decoder loop --episodes 25 \
		--pipeline examples/pipelines/vla_four_composed.yaml --json benchmarks/results/vla_four_composed_bench.json

clean:
	rm -rf $(VENV) $(SERVE) build *.egg-info
