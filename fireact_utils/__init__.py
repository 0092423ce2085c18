"""FireAct study kit: generate agent trajectories, fine-tune a small LM on them, evaluate it.

Modules: config (params schema), models (load/convert LMs), tasks (questions + metrics),
tools (search), llm (LM backends), agent (ReAct/CoT/IO/Reflexion rollouts), trajectories
(formats), data (datasets + mixing), train (SFTTrainer), evaluate (metrics + CIs), pipeline (the
stages), keys (the one reuse rule), studies (sweeps), headline, pieces (a study in bundles that merge),
tables, summaries (each notebook's closing summary), plots, chain (papermill).
"""

__version__ = "0.1.0"
