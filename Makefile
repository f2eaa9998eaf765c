# vpr_ros: `make demo` sets everything up and runs the demo; `make test` runs the checks.
# Both create .venv on first use. Shared data/weights: $(SHARED) (default ../shared).

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
SHARED  ?= $(abspath ../shared)
STAMP   := $(VENV)/.installed

# Offline-friendly defaults: torchvision finds its ImageNet weights in TORCH_HOME; DDS stays on
# this machine; rclpy needs a writable log directory.
export TORCH_HOME ?= $(CURDIR)/.cache/torch
export VPR_ROS_SHARED ?= $(SHARED)
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export ROS_LOG_DIR ?= $(CURDIR)/.cache/ros_log
export HOME ?= $(CURDIR)/.cache/home
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-repeat lint msgs weights clean

setup: $(STAMP) msgs weights

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch/torchvision are pinned by constraints.txt: pip never picks an unpinned torch.
	$(PY) -m pip install -q -c constraints.txt -e '.[ros,train,fast,dev]'
	touch $(STAMP)

msgs: $(STAMP)
	$(PY) scripts/build_msgs.py

weights:
	@mkdir -p $(TORCH_HOME)/hub/checkpoints
	@if [ -f $(SHARED)/weights/mobilenet_v2-b0353104.pth ] && \
	    [ ! -e $(TORCH_HOME)/hub/checkpoints/mobilenet_v2-b0353104.pth ]; then \
	  ln -s $(SHARED)/weights/mobilenet_v2-b0353104.pth $(TORCH_HOME)/hub/checkpoints/; fi

demo: setup
	scripts/confine.sh $(VENV)/bin/vpr-ros demo --shared $(SHARED)

test: setup
	$(VENV)/bin/ruff check .
	scripts/confine.sh $(VENV)/bin/python -m pytest -q

# The ROS graph tests N times in a row with every core kept busy (run before submitting).
N ?= 20
test-repeat: setup
	LOAD=1 scripts/confine.sh scripts/repeat_tests.sh $(N) -m ros

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The accuracy study (issue #8): raw results in results/accuracy/, the page docs/results.md + docs/results/.
.PHONY: study
study: $(STAMP) weights
	nice -n 15 $(PY) scripts/accuracy_study.py

clean:
	rm -rf $(VENV) .cache build install log results
