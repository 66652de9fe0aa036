//! `spec.model.lora` → every workload pod: each adapter's storage under `/mnt/lora/<name>`
//! (downloaded by an init container running `tessera fetch` into a shared emptyDir, each
//! download then mounted on its own by `subPath`; or mounted from its PVC or OCI image, like
//! the model), and the worker's LoRA flags — `--enable-lora --max-loras N
//! --lora-modules name=/mnt/lora/name …` on an exec-form command, the same settings as
//! `TESSERA_*` environment variables on a shell-form one (whose script the operator does not
//! rewrite). Adapter criticality travels with the model's (see `render`).

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, ImageVolumeSource, PersistentVolumeClaimVolumeSource, PodSpec, Volume,
    VolumeMount,
};

use crate::api::{LLMInferenceServiceSpec, LoraAdapter};
use crate::render::Storage;
use crate::Error;

/// Where adapters are mounted in the worker.
pub const LORA_DIR: &str = "/mnt/lora";
/// The emptyDir that downloaded adapters land in.
const DOWNLOADS: &str = "kserve-lora";

/// The adapters with their names and URIs (checked by `combine::validate`).
fn adapters(spec: &LLMInferenceServiceSpec) -> Vec<(String, String)> {
    let all: Vec<&LoraAdapter> = spec.model.lora.iter().flat_map(|l| l.adapters.iter().flatten()).collect();
    all.iter().filter_map(|a| Some((a.name.clone()?, a.uri.clone()?))).collect()
}

fn mount(name: &str, path: String, read_only: bool, sub_path: Option<String>) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path, read_only: Some(read_only), sub_path, ..Default::default() }
}

/// Wire `spec.model.lora` into `pod` (its worker container is `main`).
pub(crate) fn apply(pod: &mut PodSpec, spec: &LLMInferenceServiceSpec) -> Result<(), Error> {
    let list = adapters(spec);
    if list.is_empty() {
        return Ok(());
    }
    let main =
        pod.containers.iter().position(|c| c.name == "main").ok_or_else(|| {
            Error::Invalid("the merged pod template has no container named \"main\" (the worker)".into())
        })?;
    let (mut volumes, mut mounts, mut inits) = (vec![], vec![], vec![]);
    for (i, (name, uri)) in list.iter().enumerate() {
        let field = format!("spec.model.lora.adapters[{i}].uri");
        let dir = format!("{LORA_DIR}/{name}");
        let volume = format!("kserve-lora-{i}");
        match Storage::parse_at(uri, &field)? {
            Storage::Pvc { claim, path } => {
                let pvc = PersistentVolumeClaimVolumeSource { claim_name: claim, read_only: Some(true) };
                volumes.push(Volume { name: volume.clone(), persistent_volume_claim: Some(pvc), ..Default::default() });
                mounts.push(mount(&volume, dir, true, path));
            }
            Storage::Image(reference) => {
                let image = ImageVolumeSource { reference: Some(reference), pull_policy: Some("IfNotPresent".into()) };
                volumes.push(Volume { name: volume.clone(), image: Some(image), ..Default::default() });
                mounts.push(mount(&volume, dir, true, None));
            }
            Storage::Download(uri) => {
                inits.push(Container {
                    name: format!("storage-initializer-lora-{i}"),
                    image: pod.containers[main].image.clone(),
                    command: Some(vec!["tessera".into(), "fetch".into()]),
                    args: Some(vec![uri, dir.clone()]),
                    env: pod.containers[main].env.clone(),
                    volume_mounts: Some(vec![mount(DOWNLOADS, LORA_DIR.into(), false, None)]),
                    termination_message_policy: Some("FallbackToLogsOnError".into()),
                    ..Default::default()
                });
                // Its own folder of the downloads, read-only: no mount sits inside another
                // read-only mount (a runtime cannot create mount points there).
                mounts.push(mount(DOWNLOADS, dir, true, Some(name.clone())));
            }
        }
    }
    if !inits.is_empty() {
        let empty = EmptyDirVolumeSource::default();
        volumes.push(Volume { name: DOWNLOADS.into(), empty_dir: Some(empty), ..Default::default() });
    }
    let names: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
    let pod_volumes = pod.volumes.get_or_insert_with(Vec::new);
    pod_volumes.retain(|v| !names.contains(&v.name));
    pod_volumes.extend(volumes);
    pod.init_containers.get_or_insert_with(Vec::new).extend(inits);
    let c = &mut pod.containers[main];
    let main_mounts = c.volume_mounts.get_or_insert_with(Vec::new);
    let ours: Vec<String> = mounts.iter().map(|m| m.mount_path.clone()).collect();
    main_mounts.retain(|m| !ours.contains(&m.mount_path));
    main_mounts.extend(mounts);
    let modules: Vec<String> = list.iter().map(|(name, _)| format!("{name}={LORA_DIR}/{name}")).collect();
    let max_loras = list.len().to_string();
    let shell = c.command.iter().flatten().any(|x| x.ends_with("sh") || x == "-c");
    if shell {
        let env = c.env.get_or_insert_with(Vec::new);
        for (k, v) in [
            ("TESSERA_ENABLE_LORA", "true".to_string()),
            ("TESSERA_MAX_LORAS", max_loras),
            ("TESSERA_LORA_MODULES", modules.join(",")),
        ] {
            if !env.iter().any(|e| e.name == k) {
                env.push(EnvVar { name: k.into(), value: Some(v), ..Default::default() });
            }
        }
        return Ok(());
    }
    let args = c.args.get_or_insert_with(Vec::new);
    let has = |args: &[String], f: &str| args.iter().any(|a| a == f || a.starts_with(&format!("{f}=")));
    if !has(args, "--enable-lora") {
        args.push("--enable-lora".into());
    }
    if !has(args, "--max-loras") {
        args.extend(["--max-loras".into(), max_loras]);
    }
    if !has(args, "--lora-modules") {
        args.push("--lora-modules".into());
        args.extend(modules);
    }
    Ok(())
}
