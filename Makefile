# haconnect: HAProxy as a Consul Connect data plane.
SHELL := /bin/bash
# Go from the official tarball lives in /usr/local/go/bin, not always on PATH.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
CONSUL_VERSION ?= 1.16.3
CONSUL := $(CURDIR)/.tools/consul-$(CONSUL_VERSION)/consul
export HACONNECT_CONSUL ?= $(CONSUL)
FUZZTIME ?= 30s

.PHONY: all build tools test test-cluster fuzz bench bench-mesh bench-smoke images demo demo-local demo-cluster clean

all: build

# VERSION is what `haconnect version` prints and the images' version label:
# the tag of the commit, or "dev". REVISION stands in for the commit Go
# embeds itself when it cannot (-buildvcs=false).
VERSION ?= $(shell git describe --tags --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS := -X github.com/haconnect/haconnect/internal/version.Version=$(VERSION) -X github.com/haconnect/haconnect/internal/version.Revision=$(REVISION)

## build: compile the commands into bin/
build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

## tools: install haproxy (apt) and build consul into .tools/ (idempotent)
tools:
	bash scripts/tools.sh

## test: every test (unit, end-to-end against real Consul and HAProxy) and a bounded fuzz run
test: tools
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 20m ./...
	$(MAKE) bench-smoke
	$(MAKE) fuzz

## test-cluster: every fault scenario on a real Consul cluster in containers
## (docker-compose.cluster.yml: leader loss, node partition, all servers down,
## agent restart, CA rotation; 5-6 min). `make test` runs the first two.
test-cluster: tools
	$(GO) vet -tags cluster ./e2e/
	$(GO) test -tags cluster -count=1 -timeout 30m -run '^TestCluster' -v ./e2e/

## bench-smoke: every benchmark once, briefly, so that none can rot
bench-smoke:
	$(GO) test -run '^$$' -bench . -benchtime 1x -short ./spoa/... ./e2e/

## fuzz: fuzz the SPOA's wire handling for FUZZTIME. The agent serves from
## goroutines that outlive each input, so coverage is not exactly repeatable
## and Go would spend up to a minute minimizing each "new" input (the run
## then stalls at a few dozen executions): minimizing is capped at 1s.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzAgent$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 1s ./spoa

## bench: decision-path and SPOE round-trip benchmarks
bench: tools
	$(GO) test -run '^$$' -bench . -benchmem -count 5 ./spoa/...
	$(GO) test -run '^$$' -bench 'SPOE|Handle' -benchmem -count 5 ./e2e/
	$(GO) test -run '^$$' -bench SidecarApplyLatency -benchtime 200x ./e2e/
	$(GO) test -run '^$$' -bench InboundPath -benchtime 1x -v ./e2e/

## bench-mesh: haconnect against bare HAProxy and Consul's proxy, one run;
## writes docs/benchmarks.md and docs/benchmarks.png
bench-mesh: tools
	mkdir -p docs
	HACONNECT_BENCH_REPORT=$(CURDIR)/docs/benchmarks.md $(GO) test -run '^$$' -bench '^BenchmarkMesh(GRPC)?$$' -benchtime 1x -timeout 30m -v ./e2e/

## images: build haconnect's images offline (debootstrap base, FROM scratch)
images:
	VERSION=$(VERSION) REVISION=$(REVISION) bash scripts/images.sh

## demo: the local mesh in containers (docker compose) where Docker runs,
## else the SPOA demo with local processes (dev Consul, Debian HAProxy)
demo: tools build
	@if docker info >/dev/null 2>&1; then bash scripts/compose-demo.sh; else bash scripts/demo.sh; fi

## demo-cluster: the mesh on a real Consul cluster in containers (three
## servers, three nodes with their own agents), a leader stopped under
## traffic, then torn down (DEMO_KEEP=1 leaves it running)
demo-cluster: tools
	bash scripts/cluster-demo.sh

## demo-local: the process-mode demo, Docker or not
demo-local: tools build
	bash scripts/demo.sh

clean:
	rm -rf bin/
