//! AdamW and the EMA of the weights, written out on tensors so that their whole state
//! (moments, step count, EMA weights) can be checkpointed and a resumed run continues
//! bit for bit. (tch's built-in optimisers keep their state inside libtorch, out of
//! reach of a checkpoint.)
//!
//! AdamW (Loshchilov & Hutter 2019, PyTorch's `AdamW` update order), at step k ≥ 1 with
//! learning rate η_k: p ← p − η_k·λ·p (decoupled weight decay, only on weights with ≥ 2
//! dimensions, not on biases or GroupNorm parameters); m ← β₁m + (1−β₁)g;
//! v ← β₂v + (1−β₂)g²; p ← p − η_k · (m/(1−β₁ᵏ)) / (√(v/(1−β₂ᵏ)) + ε).
//!
//! EMA: e ← d_k·e + (1−d_k)·p with d_k = min(d, (1+k)/(10+k)) (the usual warm-up of the
//! decay, so early averages are not dominated by the random initialisation).

use crate::error::{Result, WorkerError};
use std::collections::BTreeMap;
use tch::{Kind, Tensor, nn};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// β = (0.9, 0.999), ε = 1e-8, λ = 0.01 (PyTorch's defaults).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Named trainable variables of a var store, sorted by name.
pub fn trainable(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// AdamW state over named parameters.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// Zero moments for every trainable variable of `vs`.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig) -> Self {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, t) in trainable(vs) {
            m.insert(name.clone(), t.zeros_like().detach());
            v.insert(name, t.zeros_like().detach());
        }
        Self { config, m, v }
    }

    /// One update at step `k` (1-based) with learning rate `lr`, using each variable's
    /// `.grad()`.
    pub fn step(&mut self, vs: &nn::VarStore, k: u64, lr: f64) -> Result<()> {
        let c = self.config;
        let te = |e: tch::TchError| WorkerError::torch("AdamW step", e);
        let bc1 = 1.0 - c.beta1.powi(k as i32);
        let bc2 = 1.0 - c.beta2.powi(k as i32);
        tch::no_grad(|| -> Result<()> {
            for (name, p) in trainable(vs) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let m = self.m.get_mut(&name).ok_or_else(|| missing(&name))?;
                let v = self.v.get_mut(&name).ok_or_else(|| missing(&name))?;
                let mut p = p.shallow_clone();
                if c.weight_decay > 0.0 && p.dim() >= 2 {
                    let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay).map_err(te)?;
                }
                let _ = m.f_mul_scalar_(c.beta1).map_err(te)?;
                let _ = m
                    .f_add_(&g.f_mul_scalar(1.0 - c.beta1).map_err(te)?)
                    .map_err(te)?;
                let _ = v.f_mul_scalar_(c.beta2).map_err(te)?;
                let _ = v
                    .f_add_(
                        &g.f_mul(&g)
                            .map_err(te)?
                            .f_mul_scalar(1.0 - c.beta2)
                            .map_err(te)?,
                    )
                    .map_err(te)?;
                let denom = v
                    .f_div_scalar(bc2)
                    .and_then(|x| x.f_sqrt())
                    .and_then(|x| x.f_add_scalar(c.eps))
                    .map_err(te)?;
                let update = m
                    .f_div_scalar(bc1)
                    .and_then(|x| x.f_div(&denom))
                    .and_then(|x| x.f_mul_scalar(lr))
                    .map_err(te)?;
                let _ = p.f_sub_(&update).map_err(te)?;
            }
            Ok(())
        })
    }

    /// The moments as named tensors (`adam_m.<name>`, `adam_v.<name>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (n, t) in &self.m {
            out.push((format!("adam_m.{n}"), t.shallow_clone()));
        }
        for (n, t) in &self.v {
            out.push((format!("adam_v.{n}"), t.shallow_clone()));
        }
        out
    }

    /// Restores the moments from named tensors written by [`AdamW::state`].
    pub fn load_state(&mut self, named: &BTreeMap<String, Tensor>) -> Result<()> {
        for (prefix, map) in [("adam_m", &mut self.m), ("adam_v", &mut self.v)] {
            for (n, t) in map.iter_mut() {
                let key = format!("{prefix}.{n}");
                let src = named.get(&key).ok_or_else(|| {
                    WorkerError::Card(format!("checkpoint lacks optimiser state '{key}'"))
                })?;
                tch::no_grad(|| t.f_copy_(src))
                    .map_err(|e| WorkerError::torch(&format!("restoring '{key}'"), e))?;
            }
        }
        Ok(())
    }
}

fn missing(name: &str) -> WorkerError {
    WorkerError::Model(format!("no optimiser state for '{name}'"))
}

/// Gradient clipping by global L2 norm; returns the norm before clipping.
pub fn clip_grad_norm(vs: &nn::VarStore, max_norm: f64) -> Result<f64> {
    let te = |e: tch::TchError| WorkerError::torch("gradient clipping", e);
    let grads: Vec<Tensor> = trainable(vs)
        .into_iter()
        .map(|(_, p)| p.grad())
        .filter(|g| g.defined())
        .collect();
    let mut total = 0.0;
    for g in &grads {
        let n = g
            .f_square()
            .and_then(|s| s.f_sum(Kind::Double))
            .map_err(te)?
            .f_double_value(&[])
            .map_err(te)?;
        total += n;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        tch::no_grad(|| -> Result<()> {
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_scalar_(scale).map_err(te)?;
            }
            Ok(())
        })?;
    }
    Ok(norm)
}

/// Zeroes the gradients of every trainable variable.
pub fn zero_grad(vs: &nn::VarStore) {
    for (_, mut p) in trainable(vs) {
        p.zero_grad();
    }
}

/// The EMA decay used at step `k` (module docs).
pub fn ema_decay(decay: f64, k: u64) -> f64 {
    decay.min((1.0 + k as f64) / (10.0 + k as f64))
}

/// e ← d·e + (1−d)·p for every variable of `ema` from the same-named one of `model`.
pub fn ema_update(ema: &nn::VarStore, model: &nn::VarStore, d: f64) -> Result<()> {
    let te = |e: tch::TchError| WorkerError::torch("EMA update", e);
    let src = model.variables();
    tch::no_grad(|| -> Result<()> {
        for (name, e) in ema.variables() {
            let p = src
                .get(&name)
                .ok_or_else(|| WorkerError::Model(format!("EMA: no variable '{name}'")))?;
            let mut e = e.shallow_clone();
            let _ = e.f_mul_scalar_(d).map_err(te)?;
            let _ = e
                .f_add_(&p.f_mul_scalar(1.0 - d).map_err(te)?)
                .map_err(te)?;
        }
        Ok(())
    })
}
