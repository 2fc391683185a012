"""Model names and budgets: which sub-model of the one elastic model a request runs.

A request names `NAME@<budget>` in its `model` field, or `NAME` with an extra `budget` field (which wins when
both are given); bare `NAME` is the full model. A budget is anything `architecture()` takes (a fraction such as
0.5, a size such as 60M) or a device limit (`mem:300MB`, `tps:50`, see `device_budget`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from modeling_llamaflex.architecture import Architecture, full_architecture

from .device_budget import SYNTAX, is_device_budget, resolve_device_budget

logger = logging.getLogger("serving.budgets")


class BudgetError(ValueError):
    """A model name or budget the server cannot serve: the message says what is allowed."""

    def __init__(self, message: str, param: str, status: int = 400, code: str = "invalid_budget"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class Resolved:
    name: str  # the model name answered with, e.g. "smol@0.5"
    budget: str  # the budget as asked
    arch: Architecture


def _budget_text(budget) -> str:
    return f"{budget:g}" if isinstance(budget, float) else str(budget).strip()


class Family:
    """The sub-models one elastic model serves, named `NAME@<budget>`; resolutions are cached per budget."""

    def __init__(self, model, name: str, context: int | None = None, latency=None):
        self.model, self.name = model, name
        self.context = context or model.config.max_position_embeddings
        self.latency = latency
        self.created = int(time.time())
        self._cache: dict[str, Architecture] = {}
        self._lock = threading.Lock()

    # ---- /v1/models ----
    def listed_budgets(self) -> list[str]:
        return [f"{b:g}" for b in sorted(set(self.model.config.budgets))] + ["1"]

    def describe(self, budget: str) -> dict:
        arch = self.architecture(budget)
        return {"id": f"{self.name}@{budget}", "object": "model", "created": self.created, "owned_by": "llamaflex",
                "root": self.name, "budget": budget, "architecture": architecture_info(arch, self.model.config)}

    def models(self) -> list[dict]:
        return [self.describe(b) for b in self.listed_budgets()]

    # ---- requests ----
    def resolve(self, model_field: str, budget_field=None) -> Resolved:
        """The sub-model a request asks for, or a BudgetError naming what is allowed."""
        root, _, from_name = model_field.strip().partition("@")
        if root != self.name:
            listed = ", ".join(f"'{self.name}@{b}'" for b in self.listed_budgets())
            raise BudgetError(
                f"model {model_field!r} does not exist: this server serves '{self.name}' at any budget its choices "
                f"reach, as '{self.name}@<budget>' ({listed}, '{self.name}@60M', '{self.name}@mem:300MB', "
                f"'{self.name}@tps:50', ...) or as '{self.name}' with a 'budget' field",
                param="model", status=404, code="model_not_found")
        if budget_field is not None:
            budget, param = _budget_text(budget_field), "budget"
        else:
            budget, param = (from_name.strip() or "1"), "model"
        arch = self.architecture(budget, param)
        return Resolved(f"{self.name}@{budget}", budget, arch)

    def architecture(self, budget: str, param: str = "budget") -> Architecture:
        with self._lock:  # a tps: budget may measure speeds: once, not once per concurrent request
            if budget not in self._cache:
                self._cache[budget] = self._resolve(budget, param)
                logger.info("budget %s -> %s", budget, self._cache[budget])
            return self._cache[budget]

    def _resolve(self, budget: str, param: str) -> Architecture:
        try:
            if is_device_budget(budget):
                return resolve_device_budget(self.model, budget, context=self.context, latency=self.latency)
            value = float(budget) if _is_number(budget) else budget
            if value == 1:
                return full_architecture(self.model.config, budget=1.0, note="the parent (budget 1)")
            return self.model.architecture(value)
        except (ValueError, TypeError) as err:
            message = str(err)
            if not is_device_budget(budget) and "not a number" in message:
                message += f"; or a device budget, {SYNTAX}"
            if budget not in message:
                message = f"budget {budget!r}: {message}"
            raise BudgetError(message, param=param) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def architecture_info(arch: Architecture, config) -> dict:
    """What a response says about the sub-model that answered."""
    info = arch.to_dict()
    info["fraction"] = round(arch.num_parameters / config.parent_parameters(), 4)
    return info


__all__ = ["BudgetError", "Family", "Resolved", "architecture_info"]
