"""The run directory's layout (`treeopt demo -o RUN_DIR`, read by `treeopt report RUN_DIR`): every file
name, relative to RUN_DIR, in one place."""

DEMO_DIR = "runs/demo"  # the demo's default run directory
DEMO = "demo.json"  # the demo's settings and each stage's wall time
STAGES = "stages"  # stages/NAME/: the settings and input hashes that made a stage's outputs
PROMPTS = "prompts"
FIT_PROMPTS = "prompts/fit.json"  # the prompts calibrated on
HELD_PROMPTS = "prompts/bench.json"  # the held-out prompts benched on
PROMPT_SOURCE = "prompts/source.json"  # where they came from
CALIBRATION = "calibration"  # the fit prompts' calibration
HELDOUT = "calibration-heldout"  # the held-out prompts' calibration
LATENCY = "latency.csv"  # the profile
PROFILE_TREE = "profile-tree.json"  # the searched tree whose prefixes the profile times
TREE = "tree.json"  # the searched tree
SWEEP = "sweep.csv"
TREES = "trees"  # trees/NAME.json: every tree the bench runs
BENCH_DIR = "bench"
BENCH = "bench/bench.csv"
BENCH_META = "bench/bench.json"
FIGURES = "figures"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
