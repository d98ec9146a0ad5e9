"""How alike are the layers FoldGPT pairs? Weight-space distance of each adjacent pair of the
22 layers kept after removing Block Influence's 8, and how much of the difference a rank-r
SVD delta can carry (no model run: weights only):

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/foldgpt_pair_spectra.py   # from the repo root

Per pair, averaged over the 7 linear matrices: rel_diff = ||W_weak - W_important|| / ||W_weak||
(sqrt(2) = 1.414 for two unrelated matrices of equal norm), energy16/energy64 = the share of
||W_weak - W_important||^2 in the top 16/64 singular values (what --delta-rank 16/64 can
restore), norm_cos = cosine of the two members' input-norm weights.
"""
import json, torch
from layerfold.models.loading import load_model
from layerfold.nn.shared import adjacent_groups
torch.set_num_threads(1)
m = load_model(None)
layers = m.model.model.layers
sc = json.load(open("benchmarks/results/foldgpt/gates.scores.json"))
rem = set(sc["gates_removed"]); imp = sc["gates_scores"]
kept = [l for l in range(30) if l not in rem]
names = ["self_attn.q_proj","self_attn.k_proj","self_attn.v_proj","self_attn.o_proj","mlp.gate_proj","mlp.up_proj","mlp.down_proj"]
out = []
for g in adjacent_groups(22, 2):
    a, b = [kept[j] for j in g]
    best = max((a, b), key=lambda l: imp[l]); weak = b if best == a else a
    row = {"pair": [a, b], "important": best}
    rel, e16, e64 = [], [], []
    for n in names:
        wi = layers[best].get_submodule(n).weight.detach().float(); ww = layers[weak].get_submodule(n).weight.detach().float()
        d = ww - wi
        s = torch.linalg.svdvals(d) ** 2
        rel.append((d.norm() / ww.norm()).item()); e16.append((s[:16].sum() / s.sum()).item()); e64.append((s[:64].sum() / s.sum()).item())
    row.update(rel_diff=sum(rel)/7, energy16=sum(e16)/7, energy64=sum(e64)/7)
    # norms: ratio of the two members' input-norm scales
    na = layers[a].input_layernorm.weight.float(); nb = layers[b].input_layernorm.weight.float()
    row["norm_cos"] = torch.nn.functional.cosine_similarity(na, nb, dim=0).item()
    out.append(row); print(json.dumps(row), flush=True)
json.dump(out, open("benchmarks/results/foldgpt-share-1203/pair_spectra.json", "w"), indent=1)
