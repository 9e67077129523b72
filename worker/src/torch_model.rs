//! [`TorchModel`]: a libtorch score model (TorchScript, or the native U-Net traced to
//! TorchScript) implementing [`ScoreModel`], so the in-process reference driver and the
//! gRPC service run exactly the same code.
//!
//! # Numerical reproducibility
//!
//! libtorch's CPU convolutions are *not* bitwise invariant to the batch size (oneDNN picks
//! different blockings: a patch evaluated alone and inside a batch of 16 differ by ~1e-6),
//! but for a fixed batch size each patch's result depends only on that patch: not on its
//! position in the batch, its neighbours, or the intra-op thread count, and grad mode
//! does not change ε (all checked in `worker/tests/model.rs`). So every evaluation
//! here runs in fixed-size micro-batches of [`EvalOptions::eval_batch`] patches, zero-padding
//! the last one. Then the ε of a patch is a function of (patch, t, model, device,
//! eval_batch, precision) only, and coalescing requests in the worker, or splitting a job's
//! patches differently across workers, cannot change a single bit. Workers that should
//! give identical results must share device type, precision and `eval_batch`.
//!
//! The TorchScript graph executor's optimiser is switched off on evaluating threads: its
//! profiling runs and the re-optimised (on GPUs possibly fused) graph that follows could
//! otherwise give different bits for the first calls than for later ones.

use crate::card::{Architecture, ModelCard, card_path_for, sha256_file};
use crate::device::{DeviceSpec, configure_threads};
use crate::error::{Result, WorkerError, catch_torch};
use crate::unet::{UNet3d, load_safetensors, parameter_count, trace, trace_bf16};
use dmqsm_common::atomic_file::AtomicFile;
use dmqsm_common::diffusion::model::{ModelSpec, ScoreModel};
use ndarray::{Array4, ArrayView4};
use std::path::Path;
use tch::{CModule, Kind, Tensor};

/// How a [`TorchModel`] evaluates batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalOptions {
    /// Fixed micro-batch size (see the module docs): batches are cut into chunks of this
    /// many patches and the last chunk is zero-padded.
    pub eval_batch: usize,
    /// Run weights and activations in bfloat16 (inputs and outputs stay f32). Meant for
    /// GPUs; tch cannot select libtorch's autocast dtype, so the whole module is cast.
    pub bf16: bool,
    /// libtorch intra-op threads for the evaluating thread (`None`: libtorch default).
    pub threads: Option<usize>,
}

impl EvalOptions {
    /// Defaults for a device: micro-batch 1 on CPU (batching buys little there), 8 on
    /// CUDA; f32; default threads.
    pub fn for_device(device: DeviceSpec) -> Self {
        Self {
            eval_batch: if device.is_cuda() { 8 } else { 1 },
            bf16: false,
            threads: None,
        }
    }
}

/// A libtorch score model on one device.
#[derive(Debug)]
pub struct TorchModel {
    module: CModule,
    card: ModelCard,
    spec: ModelSpec,
    device: DeviceSpec,
    options: EvalOptions,
}

impl TorchModel {
    /// Loads a model by path: `*.safetensors` is a native U-Net (its card beside it must
    /// describe the architecture), anything else a TorchScript module with its card beside
    /// it (`dir/model.pt` → `dir/model.card.json`).
    pub fn load(path: &Path, device: DeviceSpec, options: EvalOptions) -> Result<Self> {
        let is_safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if is_safetensors {
            Self::load_safetensors(path, device, options)
        } else {
            Self::load_torchscript(path, device, options)
        }
    }

    fn read_card(model: &Path) -> Result<ModelCard> {
        let card_path = card_path_for(model);
        if !card_path.exists() {
            return Err(WorkerError::Card(format!(
                "no model card beside {}: expected {}",
                model.display(),
                card_path.display()
            )));
        }
        ModelCard::load(&card_path)
    }

    /// Loads a TorchScript module and its card.
    pub fn load_torchscript(path: &Path, device: DeviceSpec, options: EvalOptions) -> Result<Self> {
        device.check_available()?;
        let mut card = Self::read_card(path)?;
        let file_hash = sha256_file(path)?;
        if let Some(expected) = &card.torchscript_sha256
            && *expected != file_hash
        {
            return Err(WorkerError::Card(format!(
                "{}: SHA-256 {file_hash} differs from the card's torchscript_sha256 {expected}",
                path.display()
            )));
        }
        if card.weights_sha256.is_empty() {
            card.weights_sha256 = file_hash;
        }
        let module = catch_torch("loading TorchScript", || {
            CModule::load_on_device(path, device.to_tch())
                .map_err(|e| WorkerError::torch(&format!("loading {}", path.display()), e))
        })?;
        Self::from_module(module, card, device, options)
    }

    /// Loads native U-Net weights (safetensors) described by the card beside them, and
    /// traces the network to TorchScript.
    pub fn load_safetensors(path: &Path, device: DeviceSpec, options: EvalOptions) -> Result<Self> {
        device.check_available()?;
        let mut card = Self::read_card(path)?;
        let Architecture::Unet3d(config) = card.architecture.clone() else {
            return Err(WorkerError::Card(format!(
                "{}: safetensors weights need a card with architecture kind 'unet3d'",
                path.display()
            )));
        };
        let file_hash = sha256_file(path)?;
        if !card.weights_sha256.is_empty() && card.weights_sha256 != file_hash {
            return Err(WorkerError::Card(format!(
                "{}: SHA-256 {file_hash} differs from the card's weights_sha256 {}",
                path.display(),
                card.weights_sha256
            )));
        }
        card.weights_sha256 = file_hash;
        let bf16 = options.bf16;
        let module = catch_torch("building the U-Net", || {
            let mut vs = tch::nn::VarStore::new(device.to_tch());
            let net = UNet3d::new(&vs.root(), &config);
            load_safetensors(&vs, path)?;
            card.parameter_count = parameter_count(&vs);
            if bf16 {
                trace_bf16(&vs, &config, card.patch_size)
            } else {
                trace(&mut vs, &net, card.patch_size)
            }
        })?;
        Self::wrap(module, card, device, options, bf16)
    }

    /// Traces an in-memory U-Net (freezing `vs`) and wraps it. `card.weights_sha256`
    /// empty is filled with [`weights_digest`](crate::unet::weights_digest).
    pub fn from_unet(
        vs: &mut tch::nn::VarStore,
        net: &UNet3d,
        mut card: ModelCard,
        device: DeviceSpec,
        options: EvalOptions,
    ) -> Result<Self> {
        if card.weights_sha256.is_empty() {
            card.weights_sha256 = crate::unet::weights_digest(vs)?;
        }
        card.parameter_count = parameter_count(vs);
        let module = if options.bf16 {
            trace_bf16(vs, net.config(), card.patch_size)?
        } else {
            trace(vs, net, card.patch_size)?
        };
        let bf16 = options.bf16;
        Self::wrap(module, card, device, options, bf16)
    }

    /// Wraps an already built module. Puts it in eval mode, casts its parameters to
    /// bf16 if asked, and runs one probe batch to check the contract (output shape
    /// `[B, 1, P, P, P]`). Modules traced from tch keep their weights as graph constants,
    /// which a cast does not reach: serve native U-Nets in bf16 from their safetensors.
    pub fn from_module(
        module: CModule,
        card: ModelCard,
        device: DeviceSpec,
        options: EvalOptions,
    ) -> Result<Self> {
        Self::wrap(module, card, device, options, false)
    }

    fn wrap(
        mut module: CModule,
        card: ModelCard,
        device: DeviceSpec,
        options: EvalOptions,
        already_bf16: bool,
    ) -> Result<Self> {
        card.validate().map_err(WorkerError::Card)?;
        if options.eval_batch == 0 {
            return Err(WorkerError::Config("eval_batch must be at least 1".into()));
        }
        catch_torch("preparing the module", || {
            module
                .f_set_eval()
                .map_err(|e| WorkerError::torch("set_eval", e))?;
            if options.bf16 && !already_bf16 {
                module.to(device.to_tch(), Kind::BFloat16, false);
            }
            Ok(())
        })?;
        let spec = card.spec();
        let model = Self {
            module,
            card,
            spec,
            device,
            options,
        };
        let p = model.spec.patch_size;
        let probe = Array4::<f32>::zeros((1, p, p, p));
        model.eps_impl(probe.view(), &[0.0]).map_err(|e| {
            let hint = if model.options.bf16 && !already_bf16 {
                " (for bf16 the module's weights must be parameters; modules traced by tch \
                 hold them as constants: serve a native U-Net's .safetensors instead)"
            } else {
                ""
            };
            WorkerError::Card(format!(
                "the module does not follow the contract forward(x: [B,1,{p},{p},{p}], t: [B]) \
                 -> [B,1,{p},{p},{p}]: {e}{hint}"
            ))
        })?;
        Ok(model)
    }

    /// The model card (with `weights_sha256` and `parameter_count` filled in).
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// The TorchScript module.
    pub fn module(&self) -> &CModule {
        &self.module
    }

    /// The device it runs on.
    pub fn device(&self) -> DeviceSpec {
        self.device
    }

    /// The evaluation options.
    pub fn options(&self) -> &EvalOptions {
        &self.options
    }

    /// Saves the TorchScript module to `path` and its card beside it (with
    /// `torchscript_sha256` set). Returns the card written.
    pub fn save_torchscript(&self, path: &Path) -> Result<ModelCard> {
        if self.options.bf16 {
            return Err(WorkerError::Config(
                "refusing to export a bf16-cast module; load it without --bf16-autocast".into(),
            ));
        }
        let file = AtomicFile::new(path).map_err(|e| WorkerError::io(path, e))?;
        catch_torch("saving TorchScript", || {
            self.module
                .save(file.path())
                .map_err(|e| WorkerError::torch(&format!("saving {}", path.display()), e))
        })?;
        file.commit().map_err(|e| WorkerError::io(path, e))?;
        let mut card = self.card.clone();
        card.torchscript_sha256 = Some(sha256_file(path)?);
        card.save(&card_path_for(path))?;
        Ok(card)
    }

    fn check_batch(&self, patches: &ArrayView4<'_, f32>, t: &[f32]) -> Result<usize> {
        let p = self.spec.patch_size;
        let s = patches.shape();
        if s[1] != p || s[2] != p || s[3] != p {
            return Err(WorkerError::InvalidArgument(format!(
                "patches have shape {s:?}, this model needs [B, {p}, {p}, {p}]"
            )));
        }
        if t.len() != s[0] {
            return Err(WorkerError::InvalidArgument(format!(
                "{} timesteps for {} patches",
                t.len(),
                s[0]
            )));
        }
        Ok(s[0])
    }

    fn eps_impl(&self, patches: ArrayView4<'_, f32>, t: &[f32]) -> Result<Array4<f32>> {
        let b = self.check_batch(&patches, t)?;
        let (eps, _) = self.evaluate(patches, t, None, b)?;
        Ok(eps)
    }

    fn vjp_impl(
        &self,
        patches: ArrayView4<'_, f32>,
        t: &[f32],
        cotangent: ArrayView4<'_, f32>,
    ) -> Result<Array4<f32>> {
        let b = self.check_batch(&patches, t)?;
        if cotangent.shape() != patches.shape() {
            return Err(WorkerError::InvalidArgument(format!(
                "cotangents have shape {:?}, patches {:?}",
                cotangent.shape(),
                patches.shape()
            )));
        }
        // ε is computed on the way (the VJP differentiates it) and not returned.
        let (_, vjp) = self.evaluate(patches, t, Some(cotangent), b)?;
        vjp.ok_or_else(|| WorkerError::Model("VJP missing".into()))
    }

    /// Runs the fixed-size micro-batches. Returns ε and, with a cotangent, Jᵀv.
    fn evaluate(
        &self,
        patches: ArrayView4<'_, f32>,
        t: &[f32],
        cotangent: Option<ArrayView4<'_, f32>>,
        b: usize,
    ) -> Result<(Array4<f32>, Option<Array4<f32>>)> {
        configure_threads(self.options.threads);
        // TorchScript's profiling executor re-optimises a graph after its first runs (and
        // may fuse kernels on GPUs), which could change the bits between the first and
        // later calls. Run the graph as traced instead (a per-thread setting).
        tch::jit::f_set_graph_executor_optimize(false)
            .map_err(|e| WorkerError::torch("disabling the graph optimiser", e))?;
        let p = self.spec.patch_size;
        let vox = p * p * p;
        let eb = self.options.eval_batch;
        let x_all = patches.as_standard_layout();
        let x_all = x_all
            .as_slice()
            .ok_or_else(|| WorkerError::Model("patches are not contiguous".into()))?;
        let v_all = cotangent.map(|v| v.as_standard_layout().to_owned());
        let v_all = match &v_all {
            Some(v) => Some(
                v.as_slice()
                    .ok_or_else(|| WorkerError::Model("cotangents are not contiguous".into()))?,
            ),
            None => None,
        };
        let mut eps = vec![0f32; b * vox];
        let mut vjp = v_all.map(|_| vec![0f32; b * vox]);
        let mut start = 0;
        while start < b {
            let n = eb.min(b - start);
            let mut xbuf = vec![0f32; eb * vox];
            xbuf[..n * vox].copy_from_slice(&x_all[start * vox..(start + n) * vox]);
            let mut tbuf = vec![0f32; eb];
            tbuf[..n].copy_from_slice(&t[start..start + n]);
            let vbuf = v_all.map(|v| {
                let mut buf = vec![0f32; eb * vox];
                buf[..n * vox].copy_from_slice(&v[start * vox..(start + n) * vox]);
                buf
            });
            let range = start * vox..(start + n) * vox;
            let vjp_dst = vjp.as_mut().map(|g| &mut g[range.clone()]);
            self.run_chunk(&xbuf, &tbuf, vbuf.as_deref(), n, &mut eps[range], vjp_dst)?;
            start += n;
        }
        if let Some(bad) = eps.iter().position(|v| !v.is_finite()) {
            return Err(WorkerError::Model(format!(
                "the model produced a non-finite ε (patch {}, voxel {})",
                bad / vox,
                bad % vox
            )));
        }
        let shape = (b, p, p, p);
        let eps = Array4::from_shape_vec(shape, eps)
            .map_err(|e| WorkerError::Model(format!("reshaping ε: {e}")))?;
        let vjp = vjp
            .map(|g| Array4::from_shape_vec(shape, g))
            .transpose()
            .map_err(|e| WorkerError::Model(format!("reshaping Jᵀv: {e}")))?;
        Ok((eps, vjp))
    }

    /// One micro-batch through libtorch; copies the first `n` patches of the results out.
    fn run_chunk(
        &self,
        xbuf: &[f32],
        tbuf: &[f32],
        vbuf: Option<&[f32]>,
        n: usize,
        eps_dst: &mut [f32],
        vjp_dst: Option<&mut [f32]>,
    ) -> Result<()> {
        let p = self.spec.patch_size as i64;
        let eb = tbuf.len() as i64;
        let dev = self.device.to_tch();
        let kind = if self.options.bf16 {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let te = |e: tch::TchError| WorkerError::torch("libtorch", e);
        catch_torch("evaluating the model", || {
            let x = Tensor::f_from_slice(xbuf)
                .and_then(|x| x.f_view([eb, 1, p, p, p]))
                .and_then(|x| x.f_to_device(dev))
                .and_then(|x| x.f_to_kind(kind))
                .map_err(te)?;
            let t = Tensor::f_from_slice(tbuf)
                .and_then(|t| t.f_to_device(dev))
                .map_err(te)?;
            let expected = vec![eb, 1, p, p, p];
            let check = |out: &Tensor| -> Result<()> {
                if out.size() != expected {
                    return Err(WorkerError::Model(format!(
                        "the model returned shape {:?}, expected {expected:?}",
                        out.size()
                    )));
                }
                Ok(())
            };
            match (vbuf, vjp_dst) {
                (None, _) => {
                    let out = tch::no_grad(|| self.module.forward_ts(&[&x, &t])).map_err(te)?;
                    check(&out)?;
                    copy_out(&out, n, eps_dst)?;
                }
                (Some(v), Some(vjp_dst)) => {
                    let x = x.f_set_requires_grad(true).map_err(te)?;
                    let out = tch::with_grad(|| self.module.forward_ts(&[&x, &t])).map_err(te)?;
                    check(&out)?;
                    let v = Tensor::f_from_slice(v)
                        .and_then(|v| v.f_view([eb, 1, p, p, p]))
                        .and_then(|v| v.f_to_device(dev))
                        .and_then(|v| v.f_to_kind(out.kind()))
                        .map_err(te)?;
                    let s = tch::with_grad(|| out.f_mul(&v).and_then(|m| m.f_sum(Kind::Float)))
                        .map_err(te)?;
                    let grads = Tensor::f_run_backward(&[&s], &[&x], false, false).map_err(te)?;
                    let g = grads.into_iter().next().ok_or_else(|| {
                        WorkerError::Model("backward returned no gradient".into())
                    })?;
                    copy_out(&out.detach(), n, eps_dst)?;
                    copy_out(&g, n, vjp_dst)?;
                }
                (Some(_), None) => {
                    return Err(WorkerError::Model("VJP buffer missing".into()));
                }
            }
            Ok(())
        })
    }
}

/// Copies the first `n` patches of a `[eb, 1, P, P, P]` tensor into `dst` as f32.
fn copy_out(t: &Tensor, n: usize, dst: &mut [f32]) -> Result<()> {
    let te = |e: tch::TchError| WorkerError::torch("copying results", e);
    let host = t
        .f_narrow(0, 0, n as i64)
        .and_then(|x| x.f_to_kind(Kind::Float))
        .and_then(|x| x.f_to_device(tch::Device::Cpu))
        .and_then(|x| x.f_contiguous())
        .map_err(te)?;
    let numel = host.numel();
    if numel != dst.len() {
        return Err(WorkerError::Model(format!(
            "result has {numel} values, expected {}",
            dst.len()
        )));
    }
    host.f_copy_data(dst, numel).map_err(te)
}

impl ScoreModel for TorchModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn eps(&self, patches: ArrayView4<'_, f32>, t: &[f32]) -> dmqsm_common::Result<Array4<f32>> {
        Ok(self.eps_impl(patches, t)?)
    }

    fn vjp(
        &self,
        patches: ArrayView4<'_, f32>,
        t: &[f32],
        cotangent: ArrayView4<'_, f32>,
    ) -> dmqsm_common::Result<Array4<f32>> {
        Ok(self.vjp_impl(patches, t, cotangent)?)
    }
}
