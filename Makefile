# The newcomer's door. `make test` and `make demo` are all the set-up a fresh Debian machine needs.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
RUST_SRC := $(shell find src -name '*.rs') Cargo.toml Cargo.lock
PY_SRC := $(shell find python -name '*.py' -o -name '*.pyi')

.PHONY: test demo soak interop fuzz lint rust-test py-test stubtest docs build wheel wheel-test deps mosquitto bench clean

test: lint rust-test stubtest docs wheel-test py-test

# A local Capture emulator with a simulated plant, watched live for a few seconds, then a pandas summary.
demo: $(STAMPS)/build mosquitto
	$(VENV)/bin/capture-mqtt demo

# Python tools and libraries pinned in pyproject.toml's `dev` extra.
$(STAMPS)/deps: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']))" \
		> $(STAMPS)/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(STAMPS)/requirements.txt
	@touch $@

deps: $(STAMPS)/deps

mosquitto:
	@scripts/install-mosquitto.sh

# The wheel users install, into dist/: abi3 (CPython >= 3.11), linked with zig (the `ziglang` package
# of the dev extra) against glibc 2.17, so that it installs on any Linux of the manylinux2014 policy,
# which maturin checks; and the sdist, which builds from scratch wherever Rust is.
$(STAMPS)/wheel: $(STAMPS)/deps $(RUST_SRC) $(PY_SRC) pyproject.toml README.md Makefile
	rm -f dist/capture_mqtt-*
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/maturin build --quiet --release --zig \
		--compatibility manylinux2014 --out dist
	$(VENV)/bin/maturin sdist --out dist >/dev/null
	@touch $@

wheel: $(STAMPS)/wheel

# That wheel, installed into the venv for the tests, the demo and the benchmarks (so they run what
# users get; `make` installs it again after a change to the sources).
$(STAMPS)/build: $(STAMPS)/wheel
	$(PY) -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps dist/capture_mqtt-*.whl
	@# The extension beside the sources too, for the API reference, which reads python/ (make docs).
	cp "$$(cd / && $(CURDIR)/$(PY) -c 'import capture_mqtt._core as m; print(m.__file__)')" python/capture_mqtt/
	@touch $@

build: $(STAMPS)/build

# The wheel in a fresh venv without Rust on the PATH: import, parse, the emulator, subscribe, push.
wheel-test: $(STAMPS)/wheel mosquitto
	scripts/wheel-smoke.sh

lint: $(STAMPS)/deps
	cargo fmt --check
	cargo clippy --quiet --all-targets --all-features -- -D warnings
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

rust-test: mosquitto
	cargo test --quiet

stubtest: $(STAMPS)/build
	$(PY) -m mypy.stubtest capture_mqtt --allowlist stubtest-allowlist.txt --mypy-config-file pyproject.toml

# The documentation site (README, the guides in docs/, the API reference from the docstrings and stubs)
# into site/; a warning (a broken link or reference) fails it.
docs: $(STAMPS)/build
	$(VENV)/bin/mkdocs build --strict  # not --quiet: it hides the warnings that --strict counts

# The asyncio tests once more on an event loop without add_reader, as Windows' default loop is.
py-test: $(STAMPS)/build mosquitto
	$(PY) -m pytest -q
	CAPTURE_MQTT_TEST_LOOP=no-add-reader $(PY) -m pytest -q -k "async or aio" -m "not doorbell" tests

bench: $(STAMPS)/build mosquitto
	$(PY) benchmarks/bench_parse.py
	$(PY) benchmarks/bench_receive.py
	$(PY) benchmarks/bench_push.py
	$(PY) benchmarks/bench_live.py
	$(PY) benchmarks/report.py

# Reliability at full size (broker restarts and kills, stalls, exits, load, slow consumers); the
# figures go into docs/reliability.md. Sizes: SOAK_MESSAGES, SOAK_RESTARTS, SOAK_EXIT_RUNS,
# SOAK_LOAD_SECONDS, SOAK_SLOW_SECONDS.
soak: $(STAMPS)/build mosquitto
	$(PY) -m soak.run

# The interoperability table: every scenario with this SDK and with paho-mqtt on every broker the suite
# can start here (INTEROP_MESSAGES a stream, default 10,000); written into docs/interoperability.md.
# Installs what is missing first (scripts/install-interop-brokers.sh): RabbitMQ, ActiveMQ, rumqttd.
interop: $(STAMPS)/build mosquitto
	@scripts/install-interop-brokers.sh
	$(PY) -m interop.run

# Coverage-guided fuzzing of the parsers, FUZZ_SECONDS per target (default 300).
fuzz:
	scripts/fuzz.sh

clean:
	rm -rf $(STAMPS) target $(VENV) site
