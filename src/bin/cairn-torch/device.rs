//! Choosing the libtorch device, and making CUDA visible in the first place.

use cairn::embed::DeviceChoice;
use tch::Device;

/// Makes CUDA visible to libtorch when the CUDA library is installed: rustc links with
/// --as-needed, which drops libtorch_cuda.so, so load it by hand (harmless on CPU-only
/// machines, where it is absent).
pub fn load_cuda_library() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let name = std::ffi::CString::new("libtorch_cuda.so").expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is intentionally leaked so the
        // library stays loaded for the life of the process.
        unsafe {
            libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        }
    });
}

/// The device for `choice` and why it was chosen (printed to the user).
pub fn pick(choice: DeviceChoice) -> Result<(Device, String), String> {
    load_cuda_library();
    let cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Auto if cuda => Ok((Device::Cuda(0), "auto: CUDA is available".into())),
        DeviceChoice::Auto => Ok((Device::Cpu, "auto: no CUDA device visible to libtorch".into())),
        DeviceChoice::Cpu => Ok((Device::Cpu, "requested".into())),
        DeviceChoice::Cuda(n) if cuda && (n as i64) < tch::Cuda::device_count() => {
            Ok((Device::Cuda(n), "requested".into()))
        }
        DeviceChoice::Cuda(n) => Err(format!(
            "device cuda:{n} requested but libtorch sees {} CUDA device(s); use device: auto or cpu",
            if cuda { tch::Cuda::device_count() } else { 0 }
        )),
    }
}

/// A device's display name.
pub fn name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    }
}
