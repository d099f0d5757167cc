#!/usr/bin/env bash
# record.sh BIN OUTDIR : run the golden scenarios with binary BIN into OUTDIR
set -euo pipefail
BIN=$1; G=$2; R=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$G"; mkdir -p "$G"
cd "$R"
q=--quiet
python3 - "$G" "$R" <<'PY'
import json,sys
G=sys.argv[1]
beam=json.load(open(sys.argv[2] + '/demo/beam_data.json'))
pools={k:[i for i in range(0,300,3) if i!=int(k)][:40] for k in beam}
json.dump(pools,open(G+'/sampler.json','w'))
perm=list(range(300)); perm=perm[150:]+perm[:150]
json.dump(perm,open(G+'/cand_idx.json','w'))
sub={k:v for i,(k,v) in enumerate(beam.items()) if i%3!=0}
json.dump(sub,open(G+'/beam_sub.json','w'))
PY
$BIN generate --demo --output_path $G/a/rl.json $q
$BIN generate --demo --workers 2 --output_path $G/b/rl.json --save_prompts --gt_prob --reward_mode hard_plus_gtprob_plus_rel --include_source_beams --num_retrieval 1 $q
$BIN candidates --demo --output_path $G/c/cands.json $q
$BIN generate --demo --vqa_backend replay --replay_from $G/a/rl.json --reward_mode legacy --reward_alpha 0.5 --reward_beta 1 --output_path $G/d/rl.json $q
$BIN generate --demo --sampler_cache $G/sampler.json --output_path $G/e/rl.json --workers 2 $q
$BIN generate --demo --vqa_model $R/tests/fixtures/qwen2_5_vl_tiny --end_idx 12 --batch_size 4 --output_path $G/f/rl.json $q
$BIN generate --demo --beam_data $G/beam_sub.json --output_path $G/g/rl.json $q
$BIN generate --demo --output_path $G/g/rl.json --output_mode delta $q
$BIN candidates --demo --candidate_indices $G/cand_idx.json --output_path $G/h/cands.json $q
$BIN generate --demo --vqa_backend replay --replay_from $G/a/rl.parquet --format parquet --output_path $G/i/rl.json --segment_queries 7 $q
echo recorded
