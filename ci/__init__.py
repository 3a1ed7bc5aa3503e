"""kbit's build tooling: entry points run from the repository root as `python -m ci.<tool>`, over the
library in ci/kbit_ci/. ci/README.md describes the modules and the dataflow."""
