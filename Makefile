.PHONY: demo test check bench clean

demo:   ## run the seed job for real (sets up .venv and RabbitMQ)
	scripts/demo

test:   ## ruff + mypy + the whole test suite on a real broker
	scripts/test

check: test

bench:  ## latency and throughput benchmark (not part of the tests)
	CAROD_EXTRAS=dev,bench scripts/bootstrap && scripts/ensure-broker && .venv/bin/python -m bench

clean:
	rm -rf .venv .mypy_cache .ruff_cache build *.egg-info
