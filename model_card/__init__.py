"""The model card of a LlamaFlex checkpoint (generate.py, template.md), from eval/collect.py's results.json."""
