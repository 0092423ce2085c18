"""FireAct study kit: generate agent trajectories, fine-tune a small LM on them, evaluate it.

Modules: config (params schema), models (load/convert LMs), tasks (questions + metrics),
tools (search), llm (LM backends), agent (ReAct/CoT/IO/Reflexion rollouts), trajectories
(formats + mixing), train (SFTTrainer), evaluate (metrics + CIs), plots, pipeline (papermill).
"""

__version__ = "0.1.0"
