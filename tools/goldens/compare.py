#!/usr/bin/env python3
"""compare.py A B: compare two directories written by record.sh.

JSON: the record bytes (everything before `_meta`) must be identical, and
`_meta` equal apart from `created_at`, `timings`, the backend's seconds, the
output directory in paths, and the settings named in LEVERFLOW_NEW_ARGS
(comma separated: flags added since A was recorded) and the backend counters
named in LEVERFLOW_NEW_COUNTS. Parquet: rows, schema,
row groups and key-value metadata equal (`leverflow_meta` as `_meta`).
"""
import json, sys, os, pyarrow.parquet as pq
A, B = sys.argv[1], sys.argv[2]
VOL = {"created_at", "timings"}
# Settings added since the goldens were recorded (a new key of _meta.args).
NEW_ARGS = set(os.environ.get("LEVERFLOW_NEW_ARGS", "").split(",")) - {""}
# Counters of the VQA backend added since the goldens were recorded
# (keys of _meta.counts.vqa_backend, comma separated).
NEW_COUNTS = set(os.environ.get("LEVERFLOW_NEW_COUNTS", "").split(",")) - {""}
bad = 0
def strip(m):
    m = json.loads(json.dumps(m).replace(os.path.abspath(B), os.path.abspath(A)))
    [m.pop(k, None) for k in VOL]
    vb = m.get('counts', {}).get('vqa_backend')
    if isinstance(vb, dict):
        vb.pop('seconds', None)
        for k in NEW_COUNTS: vb.pop(k, None)
    args = m.get('args')
    if isinstance(args, dict):
        for k in NEW_ARGS: args.pop(k, None)
    vm = m.get('vqa_model')
    if isinstance(vm, dict) and vm.get('backend') == 'replay': vm.pop('sha256', None)
    return m
for root, _, files in os.walk(A):
    for f in sorted(files):
        pa = os.path.join(root, f); rel = os.path.relpath(pa, A); pb = os.path.join(B, rel)
        if '.state' in rel or f in ('sampler.json','cand_idx.json','beam_sub.json'): continue
        if not os.path.exists(pb): print("MISSING", rel); bad += 1; continue
        if f.endswith('.json'):
            ta, tb = open(pa,'rb').read(), open(pb,'rb').read()
            ja, jb = json.loads(ta), json.loads(tb)
            if isinstance(ja, dict) and '_meta' in ja:
                ia, ib = ta.rfind(b'"_meta"'), tb.rfind(b'"_meta"')
                if ta[:ia] != tb[:ib]: print("RECORD BYTES DIFFER", rel); bad += 1
                ma, mb = strip(ja['_meta']), strip(jb['_meta'])
                if ma != mb:
                    for k in set(ma)|set(mb):
                        if ma.get(k) != mb.get(k): print("META DIFF", rel, k, str(ma.get(k))[:300], '|', str(mb.get(k))[:300])
                    bad += 1
            else:
                ja.pop('created_at', None) if isinstance(ja, dict) else None
                jb.pop('created_at', None) if isinstance(jb, dict) else None
                if ja != jb: print("JSON DIFF", rel); bad += 1
        elif f.endswith('.parquet'):
            a, b = pq.read_table(pa), pq.read_table(pb)
            if not a.equals(b): print("PARQUET ROWS DIFFER", rel); bad += 1
            sa, sb = a.schema.remove_metadata(), b.schema.remove_metadata()
            if sa != sb: print("PARQUET SCHEMA DIFFER", rel); bad += 1
            fa, fb = pq.ParquetFile(pa), pq.ParquetFile(pb)
            if fa.metadata.num_row_groups != fb.metadata.num_row_groups: print("ROW GROUPS DIFFER", rel); bad += 1
            ka = {k: v for k, v in (a.schema.metadata or {}).items() if k != b'leverflow_meta'}
            kb = {k: v for k, v in (b.schema.metadata or {}).items() if k != b'leverflow_meta'}
            if ka != kb: print("PARQUET KV DIFFER", rel, set(ka) ^ set(kb)); bad += 1
            ma = json.loads(fa.metadata.metadata[b'leverflow_meta']); mb = json.loads(fb.metadata.metadata[b'leverflow_meta'])
            sa, sb = strip(ma), strip(mb)
            if sa != sb: print("PARQUET META DIFF", rel, [k for k in set(sa)|set(sb) if sa.get(k)!=sb.get(k)]); bad += 1
print("OK" if bad == 0 else f"{bad} differences")
sys.exit(1 if bad else 0)
