"""Retrain and promote, wiring only: the pipeline as a subflow → register the bundle → champion/challenger decision."""
from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from transfer_flow.flows.pipeline import transfer_learning
from transfer_flow.flows.run_names import training_run_name
from transfer_flow.flows.settings import PipelineSettings
from transfer_flow.storage.registry import Decision, Metric, PromotionPolicy, VersionEntry
from transfer_flow.storage.run_summary import RunSummary
from transfer_flow.tasks import promotion


class RegistrySettings(BaseModel):
    """Where trained models are kept, and when a new one replaces the champion."""

    registry: str = Field(
        description="Model registry folder: numbered versions and the champion pointer (created if missing)."
    )
    metric: Metric = Field(
        default="macro_f1", description="Score compared: accuracy, or macro F1 (each class counts the same)."
    )
    margin: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Promote when challenger ≥ champion + margin (0: ties promote the newer model).",
    )

    def policy(self) -> PromotionPolicy:
        return PromotionPolicy(metric=self.metric, margin=self.margin)


class RetrainOutcome(BaseModel):
    version: str = Field(description="Registry version of this run's bundle.")
    champion: str = Field(description="The champion after the decision.")
    decision: Decision
    run: RunSummary


@flow(name="train-and-promote", log_prints=True, flow_run_name=training_run_name)
def train_and_promote(settings: PipelineSettings, registry: RegistrySettings) -> RetrainOutcome:
    """Run the pipeline, register its model as a new version, promote it to champion if it scores at least as well."""
    summary = transfer_learning(settings)
    challenger: VersionEntry = promotion.registered_challenger(summary, settings.output, registry.registry)
    decision = promotion.promotion_decision(challenger, summary, registry.registry, registry.policy())
    champion = decision.challenger if decision.promoted else (decision.champion or decision.challenger)
    print(decision.sentence())
    return RetrainOutcome(version=challenger.version, champion=champion, decision=decision, run=summary)
