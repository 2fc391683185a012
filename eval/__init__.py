"""Evaluation: lm-eval tasks built offline (build_tasks, bigbench_tasks), the plan of lm-eval calls per budget
(plan, run by run_all.sh) and the results table and plot (collect). See eval/README.md."""
