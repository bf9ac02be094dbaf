"""The hand-written part of reference_runs/README.md: the setting, what the tables say, and the
commands for real data. Words only: every number the README shows about the runs is computed by
report.py from the run folders."""

SETTING = """\
**The setting.** The built-in synthetic arithmetic world (`meml/synthetic.py`): word problems of
one, two and three steps (difficulty 1-3, a third each), three programmatic teachers that solve
every problem correctly in different formats (expert 0 = the gold "steps" solution, expert 1 one
compact expression, expert 2 gains and losses totalled first), a 0.38M-parameter Qwen2-layout
model trained from scratch. Each seed is a different world sample (problems, tokenizer, model
initialisation), so the spread over seeds includes the data. The settings are `train.py`'s
synthetic defaults (MEF 2400 steps of 16 answers at lr 3e-3 with cosine decay; RIEL 200 steps of
8 questions x G = 8 rollouts per expert at lr 1e-4, K = 6, B = 16, λ1 = 0.1, λ2 = 1), chosen in
November to make the world learnable on a CPU and left unchanged for these runs. Every
evaluation is greedy on 1000 held-out questions of the seed's world; 300 further held-out
questions serve only to choose an expert (the dev split); learning curves use the first 150
held-out questions every 25 RIEL steps.

How the paper's methods map here: ExpertX-SFT is MEF on expert X's answers alone (one system
prompt); MoE-SFT is MEF on all three; the GRPO baselines are clipped GRPO (group-std advantages,
β = 0.04) and Dr.GRPO (A = r − mean, no β, the sum over tokens ÷ batch·max-length) from the
matching SFT checkpoint; MEML-GRPO is the paper's E3 (on-policy, max(A, 0)) with E5 and E6. The
RIEL methods that start from MoE-SFT start from the same MEF checkpoint of their seed
(`--init-from`), so their differences are RIEL's alone. "Without MEF" cannot start from random
weights here (nothing would ever be right): it starts from Expert0-SFT, a model that learned the
task from the data set's own solutions under one prompt, as the paper's base model knows
mathematics without having seen the teachers, and runs MEML's RIEL with all three expert prompts
on it. "E3 only" is MEML's RIEL without E5 and E6: the bottom of the ablation ladder (MoE-SFT,
then the paper's GRPO, then + buffer / + inter-expert, then both)."""

MAIN = """\
**Reading.** Which of the paper's claims hold on this world, judged by the tables below (a
difference counts when it exceeds twice the larger of its two standard errors):

- *MoE-SFT beats training on one expert's data* (the paper's MEF claim): **does not hold here.**
  Expert0-SFT, MEF on the gold "steps" solutions alone, is far ahead of every MoE-SFT expert and
  of the MoE majority vote, mostly on two-step questions; Expert1-SFT and Expert2-SFT are level
  with MoE-SFT's experts. The runs have equal compute (the same MEF steps), so in MoE-SFT each
  format gets a third of the steps Expert0-SFT gives its one format, and the 0.38M model is small
  enough for that to matter. This world cannot say whether the paper's claim needs a model with
  capacity to spare or teachers whose reasoning differs in more than its format.
- *RIEL helps on hard questions*: **weakly.** From the shared MEF checkpoints, MEML-GRPO's 200
  RIEL steps add a little to the mean expert, all of it on two-step questions; three-step
  questions stay near the floor for every method. GRPO and Dr.GRPO, from MoE-SFT or from any
  ExpertX-SFT, and RIEL with E3 alone add nothing measurable.
- *MEML-GRPO beats the RLVR baselines*: **holds against GRPO and Dr.GRPO from the same MoE-SFT
  checkpoints, by a small margin**, on the mean expert and on the hard questions (not on the
  oracle, which MEML lowers); **does not hold against Expert0-SFT-GRPO and -Dr.GRPO**, which keep
  the lead of the SFT they start from (the first point).
- *The hard-example buffer helps* (E6): **holds**, and it is the part that does: adding it to
  E3 alone is the largest effect of the ladder, and the buffer without E5 does better than MEML.
- *The inter-expert term helps* (E5): **does not hold at the paper's form and λ1 = 0.1**: alone
  it is within noise; on top of the buffer it costs accuracy on the hard questions. Its weighted
  loss is many times the policy loss (the λ1 table), and with the buffer it makes the experts'
  errors alike (the last table). Neither a smaller λ1 nor E5 taken per token makes it help (the
  λ1 sweep): they only make it harmless.
- *Without MEF the method loses* (the paper's ablation): **the opposite here**, for the reason
  of the first point: "without MEF" starts from Expert0-SFT, the strongest SFT model, and its
  RIEL mostly teaches the two untrained prompts to answer as expert 0 does (the buffer's gold
  targets and E5's pull toward the best expert both do that), ending level with Expert0-SFT.

What would separate the methods better: teachers whose *errors* differ, not only their formats
(here most wrong questions are wrong for all three experts from the start), more RIEL steps or a
larger model so that three-step questions leave the floor, and an SFT comparison at equal steps
per format as well as at equal compute."""

PAIRS = ""
LADDER = """\
Every rung starts from the same MEF checkpoint of its seed. The buffer is the rung that moves
accuracy; E5 alone does not, and E5 added to the buffer takes part of the buffer's gain back."""

SWEEP = """\
**Reading.** No setting of the sweep makes E5 help on this world: no cell is ahead of λ1 = 0
beyond noise, on the mean expert or on the hard questions. Summed over O+'s tokens (the paper's
form) the harm grows with its weight: within noise at λ1 = 0.01 and 0.03, a loss on the hard
questions beyond noise at 0.1 (MEML-GRPO's default) and a larger one at 0.3. Divided by |O+| it
stays within noise at every λ1 up to 0.3 (at 0.1 just on the threshold), where its weighted loss
is at most a few times E3's (the sum's is tens to hundreds of times). So E5 harms here only when
it outweighs E3 many times over, and at no weight does its pull toward the best expert's answer
show up as accuracy.

The default stays the paper's form at λ1 = 0.1 (README.md, D8 and D9). The sweep found no
setting that works better, only settings that hurt less, and making `meml-grpo` a method the
paper does not write, for no gain, would leave this project nothing to verify. What a user
should take from it: the sum's weight grows with the length of O+ (the λ1·E5 / E3 column grows
in step with λ1 here, on answers of a few dozen tokens; answers of a few hundred make it larger
again by that factor), so with long answers either scale λ1 down by the answer length or use
`--inter-expert-variant token_mean`, whose λ1 means the same at any length."""

LABEL_FREE = """\
Choosing an expert without labels costs little here: the expert chosen on the dev split is the
best expert on the eval questions in almost every run, and the most-confident-answer choice per
question is level with it (within the seeds' spread), as is the majority vote. None comes close
to the oracle, whose margin is the room a perfect per-question choice would have."""

OVERLAP = """\
After MEF most wrong questions are wrong for all three experts; the experts' distinct errors are
the questions exactly one or two of them get wrong. GRPO keeps them; RIEL with E3 alone and
Dr.GRPO keep most. The inter-expert term (which pulls the weakest expert toward the best one's
answer) turns many "two wrong" questions into "three wrong" ones; the buffer (whose targets are
the gold solutions, expert 0's format, for every expert) turns them into fewer wrong more often.
Both shrink the oracle's margin over the best expert, MEML most: its experts become alike, the
opposite of what the method's argument for several experts needs."""

REAL_DATA = """\
Nothing here has been run on real data or on a GPU: this project has no real weights and no GPU
has been lent to it (README.md, "Precision"). The commands below are what a user with the
checkpoints runs; folder names are placeholders for local folders, nothing is downloaded. The
paper's settings are train.py's defaults for a real checkpoint (MEF lr 1e-5, RIEL lr 1e-6, one
epoch each, G = 8, K = 6, B = 64, λ1 = 0.1, λ2 = 1).

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
with `torchrun --standalone --nproc_per_node 8` and add `--questions-per-step 8
--mef-batch-size 64` (README.md, "Several processes"); `--fsdp` shards a model too large to
replicate. Memory, from parameter counts (not measured on a GPU): a replicated 1.5B model with
fp32 master weights and AdamW needs ~25 GB per device before activations (weights 6 GB,
gradients 6 GB, AdamW 12 GB), which fits an 80 GB device; the 1B Llama ~16 GB. Time: the only
measurement at a real shape is on this project's 2-core CPU (one RIEL step at Qwen2.5-0.5B's
shape, 2 prompts x G = 8 x 32 tokens: ~52 s, LOG "issue 11"), which says nothing useful about a
GPU; `python -m bench.gpu_check` prints the GPU figures when run on one."""

READING = {"setting": SETTING, "main": MAIN, "pairs": PAIRS, "sweep": SWEEP, "label_free": LABEL_FREE,
           "overlap": OVERLAP, "ladder": LADDER, "real_data": REAL_DATA}
