//! `openapi.json` parses, lists exactly the server's routes, and its schemas
//! match the Rust wire types.

use std::collections::BTreeSet;

use api::types::{
    AddDeviceResponse, DeviceInfo, DeviceKind, DiskConfig, ErrorBody, HotplugMechanism,
    RemoveDeviceRequest, RngConfig, SlotInfo, TopologyNode, TopologyNodeType, VmInfo, VmState,
    VmmPingResponse, VsockConfig,
};
use api::{OPENAPI_JSON, ROUTES};
use serde::Serialize;
use serde_json::Value;

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn doc() -> Value {
    let from_file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(from_file, OPENAPI_JSON);
    serde_json::from_str(OPENAPI_JSON).unwrap()
}

#[test]
fn lists_exactly_the_server_routes() {
    let doc = doc();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (key, op) in item.as_object().unwrap() {
            if HTTP_METHODS.contains(&key.as_str()) {
                documented.insert((key.to_uppercase(), path.clone()));
                assert!(op["operationId"].is_string(), "{key} {path}");
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{key} {path} has no success answer"
                );
                for status in ["400", "405", "500"] {
                    assert!(
                        responses.contains_key(status),
                        "{key} {path} lacks {status}"
                    );
                }
            }
        }
    }
    let served: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, served);
}

/// Every `$ref` in the document points at something that exists.
#[test]
fn references_resolve() {
    fn walk(v: &Value, doc: &Value, seen: &mut usize) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    let pointer = r.strip_prefix('#').unwrap();
                    assert!(doc.pointer(pointer).is_some(), "dangling {r}");
                    *seen += 1;
                }
                map.values().for_each(|x| walk(x, doc, seen));
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, doc, seen)),
            _ => {}
        }
    }
    let doc = doc();
    let mut seen = 0;
    walk(&doc, &doc, &mut seen);
    assert!(seen > 20);
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["components"]["schemas"][name];
    assert!(s.is_object(), "no schema {name}");
    s
}

fn keys_of<T: Serialize>(value: &T) -> BTreeSet<String> {
    serde_json::to_value(value)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn check_object<T: Serialize>(doc: &Value, name: &str, full: &T) {
    let s = schema(doc, name);
    let props: BTreeSet<String> = s["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(props, keys_of(full), "properties of {name}");
    for r in s["required"].as_array().into_iter().flatten() {
        assert!(props.contains(r.as_str().unwrap()), "{name}: required {r}");
    }
}

fn check_enum<T: Serialize>(doc: &Value, name: &str, all: &[T]) {
    let listed: Vec<Value> = schema(doc, name)["enum"].as_array().unwrap().clone();
    let actual: Vec<Value> = all
        .iter()
        .map(|v| serde_json::to_value(v).unwrap())
        .collect();
    assert_eq!(listed, actual, "values of {name}");
}

#[test]
fn schemas_match_the_wire_types() {
    let doc = doc();
    let s = || Some(String::from("x"));
    check_object(&doc, "Error", &ErrorBody { error: "x".into() });
    check_object(
        &doc,
        "VmmPingResponse",
        &VmmPingResponse {
            version: "1".into(),
        },
    );
    check_object(
        &doc,
        "AddDeviceResponse",
        &AddDeviceResponse {
            id: "d".into(),
            pci_path: "p".into(),
            functions: vec![api::types::AddedFunction {
                id: "d.f1".into(),
                pci_path: "p.1".into(),
                host_bdf: "0000:09:00.1".into(),
            }],
            warnings: vec!["w".into()],
        },
    );
    check_object(
        &doc,
        "AddedFunction",
        &api::types::AddedFunction {
            id: "d.f1".into(),
            pci_path: "p.1".into(),
            host_bdf: "0000:09:00.1".into(),
        },
    );
    check_object(
        &doc,
        "DiskConfig",
        &DiskConfig {
            path: "/a".into(),
            readonly: true,
            lock: false,
            id: s(),
            serial: s(),
            port: s(),
            pci_path: s(),
            function: Some(1),
        },
    );
    check_object(
        &doc,
        "RngConfig",
        &RngConfig {
            id: s(),
            port: s(),
            pci_path: s(),
            function: Some(1),
        },
    );
    check_object(
        &doc,
        "VsockConfig",
        &VsockConfig {
            cid: 3,
            socket: "/v.sock".into(),
            id: s(),
            port: s(),
            pci_path: s(),
            function: Some(1),
        },
    );
    check_object(
        &doc,
        "UserDeviceConfig",
        &api::types::UserDeviceConfig {
            socket: "/s".into(),
            id: s(),
            port: s(),
            pci_path: s(),
            function: Some(1),
        },
    );
    check_object(
        &doc,
        "DeviceConfig",
        &api::types::DeviceConfig {
            path: "/sys/bus/pci/devices/0000:03:00.0".into(),
            id: s(),
            port: s(),
            pci_path: s(),
            function: Some(1),
            assigned: Some(vec!["0000:03:00.0".into()]),
            unassigned: vec!["0000:03:00.1".into()],
        },
    );
    check_object(
        &doc,
        "RemoveDeviceRequest",
        &RemoveDeviceRequest { id: "d".into() },
    );
    let device = DeviceInfo {
        id: "d".into(),
        kind: DeviceKind::Disk,
        pci_path: "p".into(),
        bdf: s(),
        port: s(),
        hotplugged: true,
        path: s(),
        readonly: Some(true),
        serial: s(),
        cid: Some(3),
        socket: s(),
        mac: s(),
        tap: s(),
        mtu: Some(1500),
        host_bdf: s(),
        iommu_group: Some(7),
        unassigned: vec!["0000:03:00.1".into()],
        state: Some(api::types::DeviceState::Failed),
        error: s(),
    };
    check_object(&doc, "DeviceInfo", &device);
    let function = api::types::FunctionInfo {
        function: 1,
        pci_path: "p.1".into(),
        device: "d".into(),
    };
    check_object(&doc, "FunctionInfo", &function);
    let slot = SlotInfo {
        slot: 0,
        pci_path: "p".into(),
        device: s(),
        functions: vec![function],
        staged: true,
    };
    check_object(&doc, "SlotInfo", &slot);
    let node = TopologyNode {
        id: "rp0".into(),
        node_type: TopologyNodeType::PcieRootPort,
        hotplug: HotplugMechanism::Acpi,
        pci_path: "p".into(),
        parent: s(),
        secondary_bus: Some(1),
        subordinate_bus: Some(1),
        slots: vec![slot],
    };
    check_object(&doc, "TopologyNode", &node);
    check_object(
        &doc,
        "VmInfo",
        &VmInfo {
            state: VmState::Running,
            cpus: Some(1),
            memory: Some(1),
            devices: vec![device],
            topology: vec![node],
        },
    );
    check_enum(&doc, "VmState", VmState::ALL);
    check_enum(&doc, "DeviceKind", DeviceKind::ALL);
    check_enum(&doc, "DeviceState", api::types::DeviceState::ALL);
    check_enum(&doc, "TopologyNodeType", TopologyNodeType::ALL);
    check_enum(&doc, "HotplugMechanism", HotplugMechanism::ALL);

    // The event stream's lines.
    let ev = api::events::VmEvent {
        timestamp_us: 1,
        kind: api::events::VmEventKind::Stopped {
            reason: api::events::StopReason::Error,
            error: s(),
        },
    };
    let props: BTreeSet<String> = schema(&doc, "VmEvent")["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for k in keys_of(&ev) {
        assert!(props.contains(&k), "VmEvent lacks {k}");
    }
    let names: Vec<Value> = schema(&doc, "VmEventName")["enum"]
        .as_array()
        .unwrap()
        .clone();
    assert!(names.contains(&serde_json::to_value(&ev).unwrap()["event"]));

    // Request schemas are closed, as the server rejects unknown fields.
    for name in [
        "DiskConfig",
        "RngConfig",
        "RemoveDeviceRequest",
        "VsockConfig",
    ] {
        assert_eq!(schema(&doc, name)["additionalProperties"], false, "{name}");
    }
}
