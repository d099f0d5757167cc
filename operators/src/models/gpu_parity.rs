//! The models' parity checks run through the GPU backends in f32: the
//! generic burn code that every GPU runs, with the same checks as their
//! CPU twins (`text::tests`, `generate::tests`, `vision::tests`, the pointer
//! selector's tests and `candidates::tests`), only on another backend.
//!
//! * `gpu_parity::wgpu` (feature `wgpu`) runs on whatever adapter wgpu
//!   picks; in CI that is Mesa's lavapipe, a software Vulkan device:
//!   `cargo test --workspace --features wgpu --lib gpu_parity::wgpu`.
//! * `gpu_parity::cuda` (feature `cuda`) is ignored unless asked for, as it
//!   needs an NVIDIA GPU: `cargo test --workspace --features cuda --lib
//!   gpu_parity::cuda -- --ignored`.

/// The parity set on backend `$backend`, device `$device` (of type
/// `$device_ty`), each test with the extra attributes given.
macro_rules! parity_tests {
    ($backend:ty, $device_ty:ty, $device:expr $(, #[$attr:meta])*) => {
        use crate::models::pointer_selector::tests as ps;
        use crate::models::qwen2_5_vl::generate::tests as gen;
        use crate::models::qwen2_5_vl::text::tests as text;
        use crate::models::qwen2_5_vl::vision::tests as vision;

        type W = $backend;

        fn device() -> $device_ty {
            $device
        }

        fn text_model() -> (
            crate::models::qwen2_5_vl::text::TextModel<W>,
            crate::models::qwen2_5_vl::config::Qwen25VlConfig,
        ) {
            text::load_model_on::<W>(&device())
        }

        #[test]
        $(#[$attr])*
        fn qwen_prefill_logits_within_1e_4() {
            let (m, c) = text_model();
            text::check_prefill_logits(&m, &c);
        }

        #[test]
        $(#[$attr])*
        fn qwen_left_padded_rows_match_unpadded() {
            let (m, c) = text_model();
            text::check_padded_rows(&m, &c);
        }

        #[test]
        $(#[$attr])*
        fn qwen_incremental_decode_matches_prefill() {
            let (m, c) = text_model();
            text::check_incremental_decode(&m, &c);
        }

        #[test]
        $(#[$attr])*
        fn qwen_vision_embeddings() {
            vision::check_forward(&vision::tower_on::<W>(&device()));
        }

        #[test]
        $(#[$attr])*
        fn qwen_greedy_ids() {
            let (m, c) = text_model();
            gen::check_greedy(&m, &c);
        }

        #[test]
        $(#[$attr])*
        fn qwen_beam3_ids() {
            let (m, c) = text_model();
            gen::check_beam_search(&m, &c, 1.0);
        }

        #[test]
        $(#[$attr])*
        fn qwen_beam3_repetition_penalty_ids() {
            let (m, c) = text_model();
            gen::check_beam_search(&m, &c, 1.05);
        }

        #[test]
        $(#[$attr])*
        fn qwen_left_padded_batch3_ids() {
            let (m, c) = text_model();
            gen::check_batched_prompts(&m, &c);
        }

        #[test]
        $(#[$attr])*
        fn qwen_min_and_max_new_tokens() {
            let (m, c) = text_model();
            gen::check_min_and_max_new_tokens(&m, &c);
        }

        #[test]
        $(#[$attr])*
        fn qwen_decoding_reads_k_candidates_per_prompt() {
            let (m, c) = text_model();
            gen::check_decode_traffic(&m, &c);
        }

        #[test]
        $(#[$attr])*
        fn qwen_wide_rows_argmax() {
            crate::models::qwen2_5_vl::device_decode::tests::check_wide_rows_argmax::<W>(&device());
        }

        #[test]
        $(#[$attr])*
        fn qwen_answer_log_probs() {
            let (m, c) = text_model();
            gen::check_answer_log_probs(&m, &c);
        }

        #[test]
        $(#[$attr])*
        fn pointer_selector_teacher_forced_and_greedy() {
            ps::check_teacher_forced_and_greedy(&ps::model_on::<W>(&device()));
        }

        #[test]
        $(#[$attr])*
        fn pointer_selector_batched_greedy() {
            ps::check_batched_greedy(&ps::model_on::<W>(&device()));
        }

    };
}

/// On burn's wgpu backend (the one `--device wgpu` runs).
#[cfg(feature = "wgpu")]
mod wgpu {
    parity_tests!(
        burn::backend::Wgpu<f32, i32>, // as `backends::qwen2_5_vl::WgpuBackend`
        burn::backend::wgpu::WgpuDevice,
        burn::backend::wgpu::WgpuDevice::DefaultDevice
    );
}

/// On burn's CUDA backend in f32 (`--device cuda` runs bf16 weights; the
/// parity tolerances are f32's).
#[cfg(feature = "cuda")]
mod cuda {
    parity_tests!(
        burn::backend::Cuda<f32, i32>,
        burn::backend::cuda::CudaDevice,
        burn::backend::cuda::CudaDevice::new(0),
        #[ignore = "needs an NVIDIA GPU: cargo test --workspace --features cuda --lib gpu_parity::cuda -- --ignored"]
    );
}
