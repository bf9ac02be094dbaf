"""The hand-written part of reference_runs/README.md: the setting, how to read the tables, and the
commands for real data. Words only: every number the README shows about the runs, and every
verdict, is computed by report.py from the run folders; the settings named here are filled in
from meml/config.py ({placeholders}). tests/test_reference_runs.py fails when a text here holds
a digit of its own (REAL_DATA, about real checkpoints, excepted)."""

PREMISE = """\
The comparison below can only say something about MEML-GRPO if the world gives the method what
the paper assumes: teachers that are wrong on different questions, experts that inherit those
differences, a reward that is often all-wrong for one expert while another has it right, and an
RL stage that moves accuracy at all. Each is measured from the runs (or, for the teachers, from
the world itself) and judged against the threshold the issue that asked for it set. A check
planned on several seeds is judged on their mean once all of them are in (the format check was at
first judged on its first seed alone, which it failed; it has waited for its planned seeds since,
as the GRPO check does). The format check's row also shows how far apart the formats are
within each seed: every comparison of MoE methods below pairs methods that share the same three
experts and formats, so a format's handicap falls on both sides of it; the single-expert rows
are the ones that compare formats."""

SETTING = """\
**The setting.** The built-in synthetic arithmetic world (`meml/synthetic.py`): two-step word
problems in families named by their one step that is not a plain gain (a loss, "a bags of b",
"grow k times"; a few problems have two such steps). Three programmatic teachers each misread part
of one family (a loss as a gain; a bags of b as a + b more; grow k times as k more), do their arithmetic
right and write their own format; D1 drops their wrong answers, so each expert never sees the
part of its family its teacher misreads (a loss of eight or more, bags of five or more, growing
three times) in its own format; it sees the rest. The gold solution, the buffer's SFT target, is a fourth format
no expert is taught. The model is the synthetic Qwen2-layout decoder trained from scratch. Each
seed is a different world sample (problems, tokenizer, model initialisation), so the spread over
seeds includes the data. Settings are `train.py`'s synthetic defaults: MEF {mef_steps} steps of
{mef_batch_size} answers at lr {mef_lr}; RIEL {riel_steps} steps of {riel_questions_per_step}
questions x G = {riel_group_size} rollouts per expert at lr {riel_lr}, B = {riel_buffer_capacity}.
They were chosen on settings runs before this plan, with one change after its first runs: RIEL's
steps were raised once, when seed zero's GRPO run came out just under the premise's threshold
(LOG.md says when and by how much; the runs at the old count are in git).
Every evaluation is greedy on held-out questions of the seed's world; further held-out questions
(the dev split) serve only to choose an expert.

How the paper's methods map here: ExpertX-SFT is MEF on expert X's answers alone (one system
prompt); MoE-SFT is MEF on all three at the same number of steps ("equal steps per format" gives
it three times as many); the GRPO baselines are clipped GRPO (group-std advantages, β = {grpo_beta})
and Dr.GRPO from the matching SFT checkpoint; MEML-GRPO is the paper's E3 (on-policy, max(A, 0))
with E5 and E6. "Single expert" rows take the three single-expert models together: the
dev-chosen one, or their mean; "N x G rollouts" gives each as many rollouts per question as
MEML's three experts together. The buffer control takes, at each step, as many items
as MEML's buffer took at the same step of the same seed (read from MEML's metrics), each a
random question and expert of its own step: as many gold SFT items, not chosen for being hard.
"Without MEF" starts RIEL from Gold-SFT, the same MEF steps on the gold solutions under every
expert prompt: it has seen no teacher's format, but the gold solutions have no blind spot, so
this compares MEF from blind teachers with SFT on the data set's own solutions (a secondary
comparison for that reason)."""

PRIMARY = """\
The {n} comparisons below were named in `reference_runs/runs.py` (PRIMARY) before any of their
runs was made, each planned on {seeds} seeds (the seeds column says how many are in) and on two
views, {tests} tests in all. A verdict names the
method ahead when the paired 95 % t interval over seeds excludes zero; "Bonferroni" says whether it
still holds at p < 0.05 / {tests} = {bonferroni}, the family-wise bound for all {tests} tests. A
difference that is the same on every seed has no interval and gets no verdict."""

MAIN = """\
The dev-chosen expert is the paper's inference mode (one model, one prompt, chosen on held-out
dev questions without looking at the eval questions); the mean expert weighs all prompts alike;
the oracle counts a question right when any expert is."""

COMPUTE = """\
Per run: rollouts sampled (dynamic sampling's extra ones included) and their tokens, the gold
items and tokens the buffer trained on, the share of steps that ran buffer SFT, and the
weighted E5 and E6 losses against the policy loss, each a ratio of means over the same steps. These
ratios compare the values of the loss parts, not the sizes of their gradients: E3's value is a
surrogate's (GRPO's is near zero by construction, its advantages summing to zero in each group),
so a large ratio says which part dominates the logged total, not which dominates the update; the
share of steps with buffer SFT and the gold items against the rollouts say how much of RIEL was
SFT. The SFT runs the methods start from are not
counted: one MoE-SFT run per seed for most rows, one ExpertX-SFT run per expert for the
single-expert rows, Gold-SFT for the run without MEF."""

REAL_DATA = """\
Nothing here has been run on real data or on a GPU: this project has no real weights and no GPU
has been lent to it (README.md, "Precision"). The commands below are what a user with the
checkpoints runs; folder names are placeholders for local folders, nothing is downloaded. The
settings are train.py's defaults for a real checkpoint: the paper's learning rates (MEF 1e-5,
RIEL 1e-6), one epoch each and G = 8; K = 6 and B = 64; λ1 = 0.1 and λ2 = 1, which the paper does
not give (README.md, D9).

Teacher data. The paper's experts 1 and 2 are answers from DeepSeek-R1 and Doubao-1.5-thinking;
with their answers in JSONL (`{"id", "expert", "response"}`, ids as README.md describes) pass
`--expert-data` files; with local teacher checkpoints `--teacher DIR` generates and verifies them
(written to the run folder as expert1.jsonl, expert2.jsonl):

    python train.py --model Qwen2.5-Math-1.5B --dataset gsm8k --data gsm8k/train.jsonl \\
        --teacher TEACHER1 --teacher TEACHER2 --preset moe-sft --output runs/gsm8k-moe-sft

MEF (MoE-SFT) and ExpertX-SFT, then every RIEL method from its SFT run (`--dataset mathqa
--data MathQA/train.json` and `--dataset strategyqa --data strategyqa_train.json` likewise;
`--model Llama-3.2-1B-Instruct` for the paper's second model):

    python train.py --model Qwen2.5-Math-1.5B --dataset gsm8k --data gsm8k/train.jsonl \\
        --expert-data runs/gsm8k-moe-sft/expert1.jsonl --expert-data runs/gsm8k-moe-sft/expert2.jsonl \\
        --preset moe-sft --output runs/gsm8k-moe-sft          # or: --preset expert-sft --expert X
    python train.py ...same data flags... --preset meml-grpo --init-from runs/gsm8k-moe-sft \\
        --output runs/gsm8k-meml    # or moe-sft-grpo, moe-sft-dr-grpo, meml-no-buffer, meml-no-iml;
                                    # expert-sft-grpo / -dr-grpo --expert X from the ExpertX-SFT run
    python evaluate.py --model runs/gsm8k-meml/checkpoint-NNNNNN --data gsm8k/test.jsonl --pass-k 0

On one GPU add `--device cuda --dtype bfloat16`; on 8 (the paper's setup) start the same command
with `torchrun --standalone --nproc_per_node 8` and add `--questions-per-step 8`
`--mef-batch-size 64` (README.md, "Several processes"); `--fsdp` shards a model too large to
replicate. Memory, from parameter counts (not measured on a GPU): a replicated 1.5B model with
fp32 master weights and AdamW needs ~25 GB per device before activations (weights 6 GB,
gradients 6 GB, AdamW 12 GB), which fits an 80 GB device; Llama 3.2 1B (1.24B parameters)
~20 GB. Time: the only measurement at a real shape is on this project's 2-core CPU (one RIEL
step at Qwen2.5-0.5B's shape, 2 prompts x G = 8 x 32 tokens: ~52 s, LOG "issue 11"), which says
nothing useful about a GPU; `python -m bench.gpu_check` prints the GPU figures when run on one."""

READING = {"premise": PREMISE, "setting": SETTING, "primary": PRIMARY, "main": MAIN, "compute": COMPUTE,
           "real_data": REAL_DATA}
