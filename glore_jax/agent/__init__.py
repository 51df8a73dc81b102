"""RefineRL's Skeptical-Agent: tools that check attempts, multi-turn episodes, their rollout source."""

from glore_jax.agent.config import AgentConfig
from glore_jax.agent.episodes import Episode, EpisodeShape, episode_metrics, run_episodes
from glore_jax.agent.tools import AnnotationTool, Check, ProgramTool, tool_for

__all__ = ["AgentConfig", "AnnotationTool", "Check", "Episode", "EpisodeShape", "ProgramTool", "episode_metrics",
           "run_episodes", "tool_for"]
