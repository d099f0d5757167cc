//! The Arrow schema of the Parquet output: one row per candidate, the query
//! fields repeated on each of its rows.  Unlike the JSON, `pointer` is always
//! dataset indices and `pointer_pos` always pool positions, whatever the layout.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};

/// Key of the Parquet file key-value metadata entry holding the `_meta` JSON.
pub const PARQUET_META_KEY: &str = "leverflow_meta";

/// Key of the field-level metadata entry holding a column's description.
pub const DESCRIPTION_KEY: &str = "description";

fn field(name: &str, data_type: DataType, nullable: bool, description: &str) -> Field {
    let meta = HashMap::from([(DESCRIPTION_KEY.to_string(), description.to_string())]);
    Field::new(name, data_type, nullable).with_metadata(meta)
}

/// `List<Utf8>` with non-null items.
pub fn list_utf8() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, false)))
}

/// `List<UInt64>` with non-null items.
pub fn list_u64() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::UInt64, false)))
}

fn vqa_fields() -> Vec<Field> {
    use DataType::{Boolean, Float64, UInt8, Utf8};
    vec![
        field(
            "vqa_raw_generation",
            Utf8,
            true,
            "VQA model generation before post-processing.",
        ),
        field("vqa_pred_answer", Utf8, true, "Post-processed VQA answer."),
        field(
            "vqa_correct",
            UInt8,
            true,
            "1 if the VQA accuracy is > 0, else 0.",
        ),
        field(
            "vqa_acc_score",
            Float64,
            true,
            "Official VQA accuracy of the answer, in [0, 1].",
        ),
        field(
            "vqa_gt_prob",
            Float64,
            true,
            "Expected VQA accuracy under the model's answer distribution (teacher forcing).",
        ),
        field(
            "vqa_rel_token_f1",
            Float64,
            true,
            "Best token-level F1 between the answer and the normalised GT answers.",
        ),
        field(
            "vqa_rel_edit_sim",
            Float64,
            true,
            "Best character edit similarity between the answer and the normalised GT answers.",
        ),
        field("vqa_rel_score", Float64, true, "Combined relevance score."),
        field(
            "vqa_eval_mode",
            Utf8,
            true,
            "How accuracy was computed: vqaEval, fallback or error.",
        ),
        field(
            "eval_split_used",
            Utf8,
            true,
            "Annotation split used for the accuracy: train, val or fallback.",
        ),
        field(
            "eval_failed",
            Boolean,
            true,
            "True when evaluating this candidate failed.",
        ),
        field("reward", Float64, true, "Scalar reward of the candidate."),
        field(
            "advantage",
            Float64,
            true,
            "Group-normalised advantage within the query.",
        ),
    ]
}

/// Names of the VQA / reward columns, in schema order.
pub fn vqa_column_names() -> Vec<String> {
    vqa_fields().iter().map(|f| f.name().clone()).collect()
}

/// The query's fields that come from the training split's files.
fn dataset_fields() -> Vec<Field> {
    use DataType::{UInt64, Utf8};
    vec![
        field("question_id", UInt64, false, "VQA question id."),
        field(
            "image_id",
            UInt64,
            false,
            "COCO image id of the query image.",
        ),
        field("question", Utf8, false, "Question text."),
        field(
            "gt_answers_raw",
            list_utf8(),
            false,
            "Ground-truth answers as annotated, in annotation order.",
        ),
        field(
            "gt_answers_norm",
            list_utf8(),
            false,
            "Ground-truth answers after VQA answer normalisation, same order.",
        ),
    ]
}

/// The Arrow schema of the Parquet output.
///
/// * `per_query_pool` adds `candidate_pool_ids` (per-query pools, `--sampler_cache`);
/// * `with_vqa` adds the VQA / reward columns (not written by `candidates`);
/// * `with_prompts` adds `prompt_text` (`--save_prompts`).
///
/// Every field carries a `description` in its metadata. See
/// [`arrow_schema_of`] for outputs without the dataset's query fields.
pub fn arrow_schema(per_query_pool: bool, with_vqa: bool, with_prompts: bool) -> Schema {
    arrow_schema_of(true, per_query_pool, with_vqa, with_prompts)
}

/// [`arrow_schema`], and without `question_id`, `image_id`, `question`,
/// `gt_answers_raw` and `gt_answers_norm` when `with_dataset` is false (a
/// `candidates` run without the training split's files).
pub fn arrow_schema_of(
    with_dataset: bool,
    per_query_pool: bool,
    with_vqa: bool,
    with_prompts: bool,
) -> Schema {
    use DataType::{Float64, UInt32, UInt64, Utf8};
    let mut fields = vec![field(
        "query_id",
        UInt64,
        false,
        "Dataset index of the query (the JSON record key).",
    )];
    if with_dataset {
        fields.extend(dataset_fields());
    }
    if per_query_pool {
        fields.push(field(
            "candidate_pool_ids",
            list_u64(),
            false,
            "Dataset indices of the query's candidate pool, in pool order.",
        ));
    }
    fields.extend([
        field(
            "candidate_index",
            UInt32,
            false,
            "0-based order of the candidate within its query.",
        ),
        field(
            "pointer",
            list_u64(),
            false,
            "Dataset indices of the demonstrations, in prompt order (always dataset indices).",
        ),
        field(
            "pointer_pos",
            list_u64(),
            false,
            "Positions of the demonstrations in the query's candidate pool (always pool positions).",
        ),
        field(
            "gen_method",
            Utf8,
            false,
            "How the sequence was produced: beam, retrieval, sample, random or source_beam.",
        ),
        field("beam_rank", UInt32, true, "0-based beam rank (beam candidates only)."),
        field("beam_score", Float64, true, "Beam score (beam candidates only)."),
        field(
            "logprob_score",
            Float64,
            false,
            "Log-probability of the sequence under the pointer selector (temperature 1).",
        ),
        field("temperature", Float64, true, "Sampling temperature (sampled candidates only)."),
        field(
            "sample_logprob_tempered",
            Float64,
            true,
            "Log-probability under the tempered sampling distribution (sampled candidates only).",
        ),
    ]);
    if with_vqa {
        fields.extend(vqa_fields());
    }
    if with_prompts {
        fields.push(field(
            "prompt_text",
            Utf8,
            true,
            "Full VQA prompt text (--save_prompts).",
        ));
    }
    Schema::new(fields)
}
