from __future__ import annotations

from django import forms

from .models import Profile


class AvatarForm(forms.ModelForm):
    class Meta:
        model = Profile
        fields = ["avatar"]

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.fields["avatar"].required = True
        self.fields["avatar"].widget = forms.FileInput(attrs={"accept": "image/jpeg,image/png,image/webp,image/gif"})
