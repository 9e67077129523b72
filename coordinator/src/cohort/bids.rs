//! BIDS discovery: subjects, sessions, inputs, masks, truths and sidecar metadata.
//!
//! Layout (BIDS 1.9 with the QSM derivative conventions of REFERENCE.md §8):
//! `<root>/sub-<label>/[ses-<label>/]anat/<entities>_<suffix>.nii[.gz]` with a JSON
//! sidecar `<entities>_<suffix>.json` beside it. When a subject's raw `anat/` holds no
//! input, the derivative pipelines `<root>/derivatives/<pipeline>/sub-…/[ses-…/]anat/`
//! (other than `dmqsm` itself) are searched in name order; the first one with inputs wins.
//!
//! Per input (`<entities>` = everything before the suffix):
//! - the input: `<entities>_localfield.nii[.gz]` ([`InputKind::LocalField`]) or
//!   `<entities>_Chimap.nii[.gz]` without `desc-truth` ([`InputKind::Chi`], for SR);
//! - the mask: `<entities>_mask`, `<entities>_desc-brain_mask`, else the only `*_mask`
//!   file in that folder (none: the coordinator reconstructs the whole volume);
//! - a ground truth: `<entities>_desc-truth_Chimap`, else the only `*_desc-truth_Chimap`
//!   in that folder; a label map for deep grey-matter metrics: `*_desc-truth_dseg`;
//! - metadata: the input's sidecar over a dataset-level `<root>/<suffix>.json` (BIDS
//!   inheritance): `MagneticFieldStrength` (T), `EchoTime` (s), `Units` (`ppm`, `Hz`,
//!   `rad`; default ppm) and `B0_dir` ([x, y, z] in voxel axes; QSMxT / qsm-forward's
//!   custom key; when absent the coordinator takes it from the NIfTI affine).

use super::CohortError;
use std::path::{Path, PathBuf};

/// What the cohort reconstructs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// Local (background-removed) field maps, suffix `localfield` (dipole-inversion tasks).
    LocalField,
    /// Low-resolution χ maps, suffix `Chimap` (the SR task).
    Chi,
}

impl InputKind {
    /// The BIDS suffix of the input files.
    pub fn suffix(self) -> &'static str {
        match self {
            InputKind::LocalField => "localfield",
            InputKind::Chi => "Chimap",
        }
    }
}

/// Which subjects and sessions to process (labels with or without the `sub-`/`ses-`
/// prefix; empty = all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Subject labels, e.g. `01` or `sub-01`.
    pub subjects: Vec<String>,
    /// Session labels, e.g. `pre` or `ses-pre`.
    pub sessions: Vec<String>,
}

impl Selection {
    fn wants(list: &[String], prefix: &str, label: &str) -> bool {
        list.is_empty()
            || list
                .iter()
                .any(|s| s.strip_prefix(prefix).unwrap_or(s) == label)
    }
}

/// One input found in the dataset, ready to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Acquisition {
    /// The input NIfTI (local field or χ).
    pub measurement: PathBuf,
    /// What the input is.
    pub kind: InputKind,
    /// The brain mask, when one was found.
    pub mask: Option<PathBuf>,
    /// A ground-truth χ (ppm), when one was found: metrics go into the sidecar.
    pub truth: Option<PathBuf>,
    /// A label map for the deep grey-matter linearity metric.
    pub labels: Option<PathBuf>,
    /// Field units from the sidecar: `ppm`, `hz` or `rad` (lower case).
    pub units: String,
    /// `MagneticFieldStrength` in T, when given.
    pub field_strength_t: Option<f64>,
    /// `EchoTime` in s, when given.
    pub echo_time_s: Option<f64>,
    /// `B0_dir` from the sidecar (voxel axes), when given.
    pub b0_dir: Option<[f64; 3]>,
}

/// One subject/session/input of the dataset: an [`Acquisition`] or the reason it
/// cannot be processed (reported, never fatal to the cohort).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Subject label without `sub-`.
    pub subject: String,
    /// Session label without `ses-`.
    pub session: Option<String>,
    /// BIDS entities of the output, e.g. `sub-01_ses-pre_run-1`.
    pub entities: String,
    /// The input, or why there is none.
    pub input: Result<Acquisition, String>,
}

impl Entry {
    /// Display name: `sub-01/ses-pre (sub-01_ses-pre_run-1)` style.
    pub fn name(&self) -> String {
        let mut s = format!("sub-{}", self.subject);
        if let Some(ses) = &self.session {
            s.push_str(&format!("/ses-{ses}"));
        }
        let plain = match &self.session {
            Some(ses) => format!("sub-{}_ses-{ses}", self.subject),
            None => format!("sub-{}", self.subject),
        };
        if self.entities != plain {
            s.push_str(&format!(" ({})", self.entities));
        }
        s
    }

    /// The folder of this entry's derivatives:
    /// `<root>/derivatives/dmqsm/sub-*/[ses-*/]anat`.
    pub fn output_dir(&self, root: &Path) -> PathBuf {
        let mut d = root.join("derivatives").join("dmqsm");
        d.push(format!("sub-{}", self.subject));
        if let Some(ses) = &self.session {
            d.push(format!("ses-{ses}"));
        }
        d.join("anat")
    }

    /// The χ output: `<output_dir>/<entities>_Chimap.nii.gz` (ppm).
    pub fn output_chi(&self, root: &Path) -> PathBuf {
        self.output_dir(root)
            .join(format!("{}_Chimap.nii.gz", self.entities))
    }

    /// The χ output's JSON sidecar.
    pub fn output_sidecar(&self, root: &Path) -> PathBuf {
        self.output_dir(root)
            .join(format!("{}_Chimap.json", self.entities))
    }
}

fn sorted_dirs(dir: &Path, prefix: &str) -> Result<Vec<(String, PathBuf)>, CohortError> {
    let rd = std::fs::read_dir(dir).map_err(|e| CohortError::io(dir, e))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| CohortError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(label) = name.strip_prefix(prefix)
            && !label.is_empty()
            && e.path().is_dir()
        {
            out.push((label.to_string(), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// NIfTI file name → stem without `.nii` / `.nii.gz`.
fn nifti_stem(name: &str) -> Option<&str> {
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
}

fn nifti_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            nifti_stem(&name).map(|s| (s.to_string(), e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The dataset's roots: the raw root first, then the derivative pipelines (not dmqsm).
fn bases(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if let Ok(pipelines) = sorted_dirs(&root.join("derivatives"), "") {
        out.extend(
            pipelines
                .into_iter()
                .filter(|(name, _)| name != "dmqsm")
                .map(|(_, p)| p),
        );
    }
    out
}

/// The anat folders of one subject/session: raw first, then derivative pipelines.
fn anat_dirs(root: &Path, rel: &Path) -> Vec<PathBuf> {
    bases(root)
        .into_iter()
        .map(|b| b.join(rel).join("anat"))
        .collect()
}

/// Labels of `prefix`-named folders in any of `dirs` (missing folders are skipped).
fn labels_in(dirs: &[PathBuf], prefix: &str) -> Result<Vec<String>, CohortError> {
    let mut set = std::collections::BTreeSet::new();
    for d in dirs {
        if d.is_dir() {
            set.extend(sorted_dirs(d, prefix)?.into_iter().map(|(l, _)| l));
        }
    }
    Ok(set.into_iter().collect())
}

fn read_json(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(m)) => Ok(Some(m)),
            Ok(_) => Err(format!("{}: not a JSON object", path.display())),
            Err(e) => Err(format!("{}: invalid JSON: {e}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn positive(
    meta: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    src: &str,
) -> Result<Option<f64>, String> {
    match meta.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(format!("{src}: {key} must be a positive number, got {v}")),
        },
    }
}

/// Reads the metadata of one input (sidecar over dataset-level defaults) into `acq`.
fn read_metadata(
    root: &Path,
    measurement: &Path,
    kind: InputKind,
    acq: &mut Acquisition,
) -> Result<(), String> {
    let mut meta = read_json(&root.join(format!("{}.json", kind.suffix())))?.unwrap_or_default();
    let name = measurement
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = nifti_stem(&name).unwrap_or(&name);
    let sidecar = measurement.with_file_name(format!("{stem}.json"));
    if let Some(own) = read_json(&sidecar)? {
        meta.extend(own);
    }
    let src = sidecar.display().to_string();
    acq.field_strength_t = positive(&meta, "MagneticFieldStrength", &src)?;
    acq.echo_time_s = match meta.get("EchoTime") {
        // Multi-echo sidecars list every echo; the first is used for a rad → ppm scale.
        Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_f64()),
        _ => positive(&meta, "EchoTime", &src)?,
    };
    acq.units = match meta.get("Units").and_then(|v| v.as_str()) {
        None => "ppm".into(),
        Some(u) => match u.to_ascii_lowercase().as_str() {
            "ppm" => "ppm".into(),
            "hz" => "hz".into(),
            "rad" => "rad".into(),
            other => return Err(format!("{src}: Units {other:?} is not ppm, Hz or rad")),
        },
    };
    if kind == InputKind::LocalField && acq.units != "ppm" && acq.field_strength_t.is_none() {
        return Err(format!(
            "{src}: a field in {} needs MagneticFieldStrength (T) to convert to ppm",
            acq.units
        ));
    }
    if acq.units == "rad" && acq.echo_time_s.is_none() {
        return Err(format!("{src}: a field in rad needs EchoTime (s)"));
    }
    acq.b0_dir = match meta.get("B0_dir") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let xs: Option<Vec<f64>> = v
                .as_array()
                .map(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<f64>>>())
                .unwrap_or(None);
            match xs {
                Some(x)
                    if x.len() == 3
                        && x.iter().all(|c| c.is_finite())
                        && x.iter().any(|c| *c != 0.0) =>
                {
                    Some([x[0], x[1], x[2]])
                }
                _ => {
                    return Err(format!(
                        "{src}: B0_dir must be three finite numbers, not all zero; got {v}"
                    ));
                }
            }
        }
    };
    Ok(())
}

fn pick(files: &[(String, PathBuf)], exact: &[String], tail: &str) -> Option<PathBuf> {
    for want in exact {
        if let Some((_, p)) = files.iter().find(|(s, _)| s == want) {
            return Some(p.clone());
        }
    }
    let mut any = files.iter().filter(|(s, _)| s.ends_with(tail));
    match (any.next(), any.next()) {
        (Some((_, p)), None) => Some(p.clone()),
        _ => None,
    }
}

fn entries_in(root: &Path, subject: &str, session: Option<&str>, kind: InputKind) -> Vec<Entry> {
    let mut rel = PathBuf::from(format!("sub-{subject}"));
    if let Some(s) = session {
        rel.push(format!("ses-{s}"));
    }
    let plain = match session {
        Some(s) => format!("sub-{subject}_ses-{s}"),
        None => format!("sub-{subject}"),
    };
    let suffix = format!("_{}", kind.suffix());
    let searched = anat_dirs(root, &rel);
    for dir in &searched {
        let files = nifti_files(dir);
        let inputs: Vec<&(String, PathBuf)> = files
            .iter()
            .filter(|(s, _)| s.ends_with(&suffix) && !s.contains("desc-truth"))
            .collect();
        if inputs.is_empty() {
            continue;
        }
        return inputs
            .into_iter()
            .map(|(stem, path)| {
                let entities = stem[..stem.len() - suffix.len()].to_string();
                let mut acq = Acquisition {
                    measurement: path.clone(),
                    kind,
                    mask: pick(
                        &files,
                        &[
                            format!("{entities}_mask"),
                            format!("{entities}_desc-brain_mask"),
                        ],
                        "_mask",
                    ),
                    truth: pick(
                        &files,
                        &[format!("{entities}_desc-truth_Chimap")],
                        "_desc-truth_Chimap",
                    ),
                    labels: pick(
                        &files,
                        &[format!("{entities}_desc-truth_dseg")],
                        "_desc-truth_dseg",
                    ),
                    units: "ppm".into(),
                    field_strength_t: None,
                    echo_time_s: None,
                    b0_dir: None,
                };
                let input = read_metadata(root, path, kind, &mut acq).map(|()| acq);
                Entry {
                    subject: subject.to_string(),
                    session: session.map(str::to_string),
                    entities,
                    input,
                }
            })
            .collect();
    }
    vec![Entry {
        subject: subject.to_string(),
        session: session.map(str::to_string),
        entities: plain,
        input: Err(format!(
            "no *{suffix}.nii[.gz] input in {}",
            searched
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }]
}

/// Finds every selected subject/session input under the BIDS root `root`, in subject,
/// session and file-name order. A subject or session without a usable input is returned
/// as an [`Entry`] whose `input` is the reason; only an unreadable root or a selection
/// naming subjects that do not exist is an error.
pub fn discover(
    root: &Path,
    selection: &Selection,
    kind: InputKind,
) -> Result<Vec<Entry>, CohortError> {
    if !root.is_dir() {
        return Err(CohortError::Dataset {
            path: root.to_path_buf(),
            message: "not a directory".into(),
        });
    }
    let bases = bases(root);
    let subjects = labels_in(&bases, "sub-")?;
    for want in &selection.subjects {
        let label = want.strip_prefix("sub-").unwrap_or(want);
        if !subjects.iter().any(|s| s == label) {
            return Err(CohortError::Options(format!(
                "--subjects: sub-{label} is not in {}",
                root.display()
            )));
        }
    }
    let mut out = Vec::new();
    for subject in &subjects {
        if !Selection::wants(&selection.subjects, "sub-", subject) {
            continue;
        }
        let dirs: Vec<PathBuf> = bases
            .iter()
            .map(|b| b.join(format!("sub-{subject}")))
            .collect();
        let sessions = labels_in(&dirs, "ses-")?;
        if sessions.is_empty() {
            if selection.sessions.is_empty() {
                out.extend(entries_in(root, subject, None, kind));
            }
            continue;
        }
        for session in &sessions {
            if Selection::wants(&selection.sessions, "ses-", session) {
                out.extend(entries_in(root, subject, Some(session), kind));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn finds_inputs_masks_truths_and_metadata_and_reports_problems() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        touch(
            &r.join("localfield.json"),
            r#"{"MagneticFieldStrength": 3}"#,
        );
        let a = r.join("sub-01/ses-a/anat");
        touch(&a.join("sub-01_ses-a_localfield.nii.gz"), "");
        touch(
            &a.join("sub-01_ses-a_localfield.json"),
            r#"{"B0_dir": [0, 0.1, 1], "MagneticFieldStrength": 7}"#,
        );
        touch(&a.join("sub-01_ses-a_mask.nii.gz"), "");
        touch(&a.join("sub-01_ses-a_desc-truth_Chimap.nii.gz"), "");
        touch(&r.join("sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz"), "");
        // Input only in a derivative pipeline, field in Hz without B0: an error.
        let p = r.join("derivatives/qsmxt/sub-02/anat");
        touch(&p.join("sub-02_localfield.nii"), "");
        touch(
            &p.join("sub-02_localfield.json"),
            r#"{"Units": "Hz", "MagneticFieldStrength": null}"#,
        );
        // Dataset-level 3 T applies; Hz is fine then.
        let q = r.join("sub-03/anat");
        touch(&q.join("sub-03_localfield.nii.gz"), "");
        touch(&q.join("sub-03_localfield.json"), r#"{"Units": "Hz"}"#);
        touch(&q.join("sub-03_desc-brain_mask.nii.gz"), "");

        let all = discover(r, &Selection::default(), InputKind::LocalField).unwrap();
        let names: Vec<String> = all.iter().map(Entry::name).collect();
        assert_eq!(names, ["sub-01/ses-a", "sub-01/ses-b", "sub-02", "sub-03"]);
        let a1 = all[0].input.as_ref().unwrap();
        assert_eq!(a1.field_strength_t, Some(7.0));
        assert_eq!(a1.b0_dir, Some([0.0, 0.1, 1.0]));
        assert!(a1.mask.is_some() && a1.truth.is_some() && a1.labels.is_none());
        assert!(
            all[1]
                .input
                .as_ref()
                .unwrap_err()
                .contains("no *_localfield")
        );
        assert!(
            all[2]
                .input
                .as_ref()
                .unwrap_err()
                .contains("MagneticFieldStrength"),
            "{:?}",
            all[2].input
        );
        let a3 = all[3].input.as_ref().unwrap();
        assert_eq!((a3.units.as_str(), a3.field_strength_t), ("hz", Some(3.0)));
        assert!(
            a3.mask
                .as_ref()
                .unwrap()
                .ends_with("sub-03_desc-brain_mask.nii.gz")
        );
        assert_eq!(
            all[0].output_chi(r),
            r.join("derivatives/dmqsm/sub-01/ses-a/anat/sub-01_ses-a_Chimap.nii.gz")
        );

        let sel = Selection {
            subjects: vec!["sub-01".into(), "03".into()],
            sessions: vec!["a".into()],
        };
        let some = discover(r, &sel, InputKind::LocalField).unwrap();
        assert_eq!(
            some.iter().map(Entry::name).collect::<Vec<_>>(),
            ["sub-01/ses-a"]
        );
        let bad = Selection {
            subjects: vec!["09".into()],
            sessions: vec![],
        };
        let e = discover(r, &bad, InputKind::LocalField)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sub-09"), "{e}");
        assert!(
            discover(
                &r.join("nope"),
                &Selection::default(),
                InputKind::LocalField
            )
            .is_err()
        );
    }
}
