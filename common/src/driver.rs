//! The in-process reference driver: runs the [`Sampler`] state machine against a
//! [`ScoreModel`] with the default batching. It is the baseline that the distributed
//! coordinator must match bit for bit.

use crate::diffusion::model::ScoreModel;
use crate::diffusion::posterior::{PosteriorSummary, summarize};
use crate::diffusion::sampler::{
    PatchResults, Reconstruction, RoundKind, Sampler, SamplerSettings,
};
use crate::error::{Error, Result};
use crate::tasks::Problem;
use std::sync::Arc;

/// Evaluates the open round of `sampler` with `model` in batches of at most `max_batch`
/// (the deterministic default plan) and completes it.
pub fn run_round(model: &dyn ScoreModel, sampler: &mut Sampler, max_batch: usize) -> Result<()> {
    let round = sampler
        .round()
        .ok_or_else(|| Error::Protocol("the sampler has finished".into()))?;
    for indices in sampler.plan_batches(max_batch)? {
        let batch = sampler.batch(&indices)?;
        match round.id.kind {
            RoundKind::Eps => {
                let eps = model.eps(batch.x.view(), &batch.timesteps)?;
                sampler.accept(PatchResults::new(round.id, indices, eps)?)?;
            }
            RoundKind::Vjp => {
                let cot = batch
                    .cotangent
                    .as_ref()
                    .ok_or_else(|| Error::Protocol("VJP round batch without cotangents".into()))?;
                let jtv = model.vjp(batch.x.view(), &batch.timesteps, cot.view())?;
                sampler.accept(PatchResults::new(round.id, indices, jtv)?)?;
            }
        }
    }
    sampler.complete_round()
}

/// Runs `sampler` to the end.
pub fn run(model: &dyn ScoreModel, sampler: &mut Sampler, max_batch: usize) -> Result<()> {
    while !sampler.is_finished() {
        run_round(model, sampler, max_batch)?;
    }
    Ok(())
}

/// Checks that `model` can drive a run (patch size, schedule) before starting one.
fn check_model(model: &dyn ScoreModel) -> Result<()> {
    if model.spec().patch_size == 0 {
        return Err(Error::Model(format!(
            "model {} declares patch size 0",
            model.spec().model_id
        )));
    }
    Ok(())
}

/// One posterior sample: a full DPS run of `problem` with `settings`, evaluated in
/// process in batches of at most `max_batch` patches.
pub fn sample(
    model: &dyn ScoreModel,
    problem: Arc<Problem>,
    settings: &SamplerSettings,
    max_batch: usize,
) -> Result<Reconstruction> {
    check_model(model)?;
    let mut sampler = Sampler::new(problem, model.spec(), settings.clone())?;
    run(model, &mut sampler, max_batch)?;
    sampler.result()
}

/// `samples` posterior samples with seeds `settings.seed`, `settings.seed + 1`, …, and
/// their mean and voxelwise standard deviation.
pub fn sample_posterior(
    model: &dyn ScoreModel,
    problem: Arc<Problem>,
    settings: &SamplerSettings,
    samples: usize,
    max_batch: usize,
) -> Result<(Vec<Reconstruction>, PosteriorSummary)> {
    if samples == 0 {
        return Err(Error::Parameter(
            "at least one posterior sample is needed".into(),
        ));
    }
    let recs = (0..samples as u64)
        .map(|i| {
            let s = SamplerSettings {
                seed: settings.seed.wrapping_add(i),
                ..settings.clone()
            };
            sample(model, problem.clone(), &s, max_batch)
        })
        .collect::<Result<Vec<_>>>()?;
    let summary = summarize(&recs)?;
    Ok((recs, summary))
}
