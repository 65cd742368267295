-- Test PACS auto-routing: every CR/DX instance Orthanc receives goes on to the node
-- (modality "medgemma" in orthanc.json). What the node sends back (SR, SEG) is not CR/DX,
-- so results are never routed back to it.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags["Modality"]
  if (modality == "CR" or modality == "DX") and origin["RemoteAet"] ~= "MEDGEMMA" then
    SendToModality(instanceId, "medgemma")
  end
end
